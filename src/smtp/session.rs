//! One SMTP session's state machine: each verb is a short handler that checks the state
//! and returns what to do next. No I/O happens here; `conn` drives the socket.

use std::net::SocketAddr;
use std::sync::Arc;

use smtp_proto::{AUTH_LOGIN, AUTH_PLAIN, MailFrom, RcptTo, Request};

use super::auth::{self, Progress, Step};
use super::authgate::{AuthGate, Verdict};
use super::refusals::Held;
use super::reply::{self, Reply, fixed};
use super::{line, message};
use crate::address::Mailbox;
use crate::config::Config;
use crate::intake::Intake;
use crate::policy::{Policy, Submitter};
use crate::queue::{NewMessage, NewRecipient, QueueId, Source};
use crate::reason::Reason;

/// What the connection should do after a command.
#[derive(Debug)]
pub enum Action {
    Reply(Reply),
    /// A multi-line reply already in wire form (EHLO).
    Raw(Vec<u8>),
    /// Send `354` and read the message body.
    StartData,
    /// Send `220` and upgrade the connection.
    StartTls,
    /// Send a `334` challenge and route the next line to [`Session::auth_line`].
    Challenge(&'static str),
    /// Reply, then close the connection.
    Close(Reply),
}

/// The envelope of the transaction in progress.
#[derive(Debug, Default)]
struct Envelope {
    sender: String,
    /// The campaign known before DATA (AUTH user or sender), for attributing refusals.
    campaign: Option<String>,
    recipients: Vec<Mailbox>,
    /// RCPT refusals, counted once the campaign is final.
    held: Held,
    /// MAIL carried SMTPUTF8 (RFC 6531): relayed with it.
    smtputf8: bool,
}

pub struct Session {
    intake: Arc<Intake>,
    /// The config as it was when the client connected; a reload applies to new sessions.
    config: Arc<Config>,
    peer: SocketAddr,
    helo: Option<String>,
    esmtp: bool,
    tls: bool,
    tls_available: bool,
    user: Option<String>,
    trusted_network: bool,
    envelope: Option<Envelope>,
    auth_step: Option<Step>,
    auth: Arc<AuthGate>,
    bad_commands: u32,
}

impl Session {
    pub fn new(
        intake: Arc<Intake>,
        peer: SocketAddr,
        tls_available: bool,
        auth: Arc<AuthGate>,
    ) -> Session {
        let config = intake.config.load_full();
        let trusted_network = Policy::trusted(&config, peer.ip());
        Session {
            intake,
            config,
            peer,
            helo: None,
            esmtp: false,
            tls: false,
            tls_available,
            user: None,
            trusted_network,
            envelope: None,
            auth_step: None,
            auth,
            bad_commands: 0,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn greeting(&self) -> Reply {
        Reply::owned(
            220,
            [0, 0, 0],
            format!("{} ESMTP Floodgate ready", self.config.server.hostname),
        )
    }

    pub fn in_auth(&self) -> bool {
        self.auth_step.is_some()
    }

    /// Whether a transaction is open (after MAIL): at shutdown it may finish.
    pub fn in_transaction(&self) -> bool {
        self.envelope.is_some()
    }

    /// Ends the transaction in progress without DATA (RSET, EHLO, QUIT, close, timeout):
    /// its held refusals count against the campaign known before DATA.
    pub fn end_transaction(&mut self) {
        if let Some(e) = self.envelope.take() {
            e.held.account(&self.intake, e.campaign.as_deref());
        }
    }

    pub fn max_message_size(&self) -> usize {
        self.config.smtp.max_message_size
    }

    /// Counts a protocol error; past the configured cap the session is closed, so a
    /// confused or hostile client cannot hold a slot forever.
    pub fn bad_command(&mut self, reply: Reply) -> Action {
        self.bad_commands += 1;
        if self.bad_commands > self.config.smtp.max_bad_commands {
            Action::Close(fixed::TOO_MANY_ERRORS)
        } else {
            Action::Reply(reply)
        }
    }

    /// Dispatches one parsed command.
    pub async fn handle(&mut self, request: Request<std::borrow::Cow<'_, str>>) -> Action {
        match request {
            Request::Ehlo { host } => self.ehlo(&host, true),
            Request::Helo { host } => self.ehlo(&host, false),
            Request::Lhlo { .. } => self.bad_command(fixed::UNSUPPORTED),
            Request::Mail { from } => self.mail(from),
            Request::Rcpt { to } => self.rcpt(to).await,
            Request::Data => self.data(),
            Request::Rset => {
                self.end_transaction();
                Action::Reply(fixed::RESET)
            }
            Request::Noop { .. } => Action::Reply(fixed::OK),
            Request::Quit => {
                self.end_transaction();
                Action::Close(fixed::BYE)
            }
            Request::Vrfy { .. } => Action::Reply(fixed::VRFY),
            Request::Help { .. } => Action::Reply(fixed::HELP),
            Request::StartTls => self.starttls(),
            Request::Auth {
                mechanism,
                initial_response,
            } => self.auth(mechanism, &initial_response).await,
            _ => self.bad_command(fixed::UNSUPPORTED),
        }
    }

    fn ehlo(&mut self, host: &str, esmtp: bool) -> Action {
        if !line::valid_helo(host) {
            return self.bad_command(fixed::BAD_HELO);
        }
        self.end_transaction();
        self.helo = Some(host.to_owned());
        self.esmtp = esmtp;
        if !esmtp {
            let text = format!("{} Hello {host}", self.config.server.hostname);
            return Action::Reply(Reply::owned(250, [0, 0, 0], text));
        }
        // Written straight into the reply: once per connection for clients that open
        // one per message, so no line is built on its own.
        use std::io::Write as _;
        let mut out = Vec::with_capacity(256);
        let _ = write!(
            out,
            "250-{} Hello {host}\r\n250-PIPELINING\r\n250-SIZE {}\r\n\
             250-8BITMIME\r\n250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n",
            self.config.server.hostname, self.config.smtp.max_message_size
        );
        if self.tls_available && !self.tls {
            out.extend_from_slice(b"250-STARTTLS\r\n");
        }
        if self.auth_allowed() && self.user.is_none() {
            out.extend_from_slice(b"250-AUTH PLAIN LOGIN\r\n");
        }
        out.extend_from_slice(b"250 HELP\r\n");
        Action::Raw(out)
    }

    /// AUTH needs TLS, unless the operator allowed it for loopback clients.
    fn auth_allowed(&self) -> bool {
        !self.config.smtp.users.is_empty()
            && (self.tls
                || (self.config.smtp.auth_without_tls_on_loopback
                    && self.peer.ip().to_canonical().is_loopback()))
    }

    fn mail(&mut self, from: MailFrom<std::borrow::Cow<'_, str>>) -> Action {
        if self.helo.is_none() {
            return self.bad_command(fixed::BAD_SEQUENCE_HELO);
        }
        if self.envelope.is_some() {
            return self.bad_command(fixed::BAD_SEQUENCE_NESTED);
        }
        if from.size > self.config.smtp.max_message_size {
            return Action::Reply(fixed::SIZE_DECLARED);
        }
        // The envelope holds the parsed address, never the raw argument (issue 9).
        let sender = match crate::address::parse_sender(&from.address) {
            Ok(s) => s.envelope().to_owned(),
            Err(_) => return self.bad_command(fixed::BAD_SENDER),
        };
        let campaign = self.campaign_before_data(&sender);
        self.envelope = Some(Envelope {
            sender,
            campaign,
            recipients: Vec::new(),
            held: Held::default(),
            smtputf8: from.flags & smtp_proto::MAIL_SMTPUTF8 != 0,
        });
        Action::Reply(fixed::SENDER_OK)
    }

    async fn rcpt(&mut self, to: RcptTo<std::borrow::Cow<'_, str>>) -> Action {
        let Some(envelope) = &self.envelope else {
            return self.bad_command(fixed::BAD_SEQUENCE_MAIL);
        };
        let who = Submitter {
            trusted_network: self.trusted_network,
            authenticated: self.user.is_some(),
        };
        let campaign = envelope.campaign.clone();
        let verdict = self
            .intake
            .policy
            .check_rcpt(
                &self.config,
                who,
                campaign.as_deref(),
                envelope.recipients.len(),
                &to.address,
            )
            .await;
        match verdict {
            Ok(mailbox) => {
                let envelope = self.envelope.as_mut().expect("checked above");
                if !envelope
                    .recipients
                    .iter()
                    .any(|m| m.address == mailbox.address)
                {
                    envelope.recipients.push(mailbox);
                }
                Action::Reply(fixed::RCPT_OK)
            }
            Err(reason) => {
                let envelope = self.envelope.as_mut().expect("checked above");
                envelope.held.push(reason, &to.address);
                Action::Reply(reply::for_reason(reason))
            }
        }
    }

    /// Counts a RCPT whose address could not even be parsed.
    pub fn refuse_unparsed_rcpt(&mut self, line: &str) {
        match &mut self.envelope {
            Some(e) => e.held.push(Reason::MalformedAddress, line.trim_end()),
            None => self
                .intake
                .refused(None, Reason::MalformedAddress, line.trim_end()),
        }
    }

    fn data(&mut self) -> Action {
        match &self.envelope {
            None => self.bad_command(fixed::BAD_SEQUENCE_MAIL),
            Some(e) if e.recipients.is_empty() => self.bad_command(fixed::BAD_SEQUENCE_RCPT),
            Some(_) => Action::StartData,
        }
    }

    /// The message body arrived whole (dot-unstuffed) or was too big (`None`): queue it
    /// and answer only once it is durable.
    pub async fn data_done(&mut self, body: Option<Vec<u8>>) -> Reply {
        let Some(mut envelope) = self.envelope.take() else {
            return fixed::BAD_SEQUENCE_MAIL;
        };
        let held = std::mem::take(&mut envelope.held);
        let Some(body) = body else {
            held.account(&self.intake, envelope.campaign.as_deref());
            return self.refuse_all(
                &envelope,
                envelope.campaign.as_deref(),
                Reason::MessageTooBig,
            );
        };
        // Line ends normalised, long header lines folded; a line that would still be
        // refused by the next hop is refused here, before the 250 (issue 10).
        let body = match crate::wire::prepare(body) {
            Ok(b) => b,
            Err(e) => {
                let refused =
                    self.refuse_all(&envelope, envelope.campaign.as_deref(), Reason::LineTooLong);
                return Reply::owned(refused.code, refused.esc, format!("Message refused: {e}"));
            }
        };
        let campaign = self.campaign_after_data(&envelope, &body);
        held.account(&self.intake, campaign.as_deref());
        if let Err(reason) = self.intake.policy.check_open(campaign.as_deref()) {
            return self.refuse_all(&envelope, campaign.as_deref(), reason);
        }
        // A campaign named by a header is known only now: recipients suppressed for it
        // are left out (SMTP has no per-recipient answer after DATA) and counted.
        if campaign != envelope.campaign {
            let intake = &self.intake;
            envelope.recipients.retain(|m| {
                let suppressed = intake.policy.suppressed(m, campaign.as_deref());
                if suppressed {
                    intake.refused(campaign.as_deref(), Reason::Suppressed, &m.address);
                }
                !suppressed
            });
            if envelope.recipients.is_empty() {
                return reply::for_reason(Reason::Suppressed);
            }
        }
        let now_us = self.intake.clock.now_us();
        let queue_id = QueueId::generate(now_us);
        let trace = message::received_header(&message::Trace {
            helo: self.helo.as_deref().unwrap_or("unknown"),
            peer: self.peer.ip(),
            hostname: &self.config.server.hostname,
            protocol: message::protocol(self.esmtp, self.tls, self.user.is_some()),
            queue_id: queue_id.as_str(),
            single_recipient: match envelope.recipients.as_slice() {
                [only] => Some(only.address.as_str()),
                _ => None,
            },
            now_us,
        });
        let mut stored = Vec::with_capacity(trace.len() + body.len());
        stored.extend_from_slice(trace.as_bytes());
        stored.extend_from_slice(&body);
        let msg = NewMessage {
            queue_id: queue_id.clone(),
            sender: envelope.sender,
            campaign,
            source: Source::Smtp,
            client: self.peer.ip().to_string(),
            identity: self.user.clone(),
            body: stored,
            recipients: envelope
                .recipients
                .into_iter()
                .map(|m| NewRecipient {
                    address: m.address,
                    domain: m.domain,
                })
                .collect(),
            smtputf8: envelope.smtputf8,
        };
        match self.intake.enqueue(msg).await {
            Ok(()) => Reply::owned(250, [2, 0, 0], format!("{queue_id} Message queued")),
            Err(reason) => reply::for_reason(reason),
        }
    }

    fn refuse_all(&self, envelope: &Envelope, campaign: Option<&str>, reason: Reason) -> Reply {
        for m in &envelope.recipients {
            self.intake.refused(campaign, reason, &m.address);
        }
        reply::for_reason(reason)
    }

    fn starttls(&mut self) -> Action {
        if self.tls {
            return self.bad_command(fixed::BAD_SEQUENCE_TLS);
        }
        if !self.tls_available {
            return Action::Reply(fixed::NO_TLS);
        }
        if self.envelope.is_some() {
            return self.bad_command(fixed::TLS_FIRST);
        }
        Action::StartTls
    }

    /// The TLS handshake succeeded: the session starts over (RFC 3207 §4.2).
    pub fn tls_started(&mut self) {
        self.tls = true;
        self.helo = None;
        self.esmtp = false;
        self.end_transaction();
        self.user = None;
    }

    async fn auth(&mut self, mechanism: u64, initial: &str) -> Action {
        if self.user.is_some() {
            return self.bad_command(fixed::AUTH_TWICE);
        }
        if self.helo.is_none() {
            return self.bad_command(fixed::BAD_SEQUENCE_HELO);
        }
        if self.envelope.is_some() {
            return self.bad_command(fixed::TLS_FIRST);
        }
        if self.config.smtp.users.is_empty() {
            return self.bad_command(fixed::UNSUPPORTED);
        }
        if !self.auth_allowed() {
            return Action::Reply(fixed::AUTH_NEEDS_TLS);
        }
        let plain = match mechanism {
            AUTH_PLAIN => true,
            AUTH_LOGIN => false,
            _ => return Action::Reply(fixed::AUTH_MECH),
        };
        self.progress(auth::start(plain, initial)).await
    }

    /// A client line while an AUTH exchange is under way. Bytes that are not clean
    /// UTF-8 end the exchange: they are never decoded lossily into credentials.
    pub async fn auth_line(&mut self, bytes: &[u8]) -> Action {
        let Some(step) = self.auth_step.take() else {
            return Action::Reply(fixed::UNKNOWN);
        };
        match line::text(bytes) {
            Ok(text) => self.progress(auth::advance(step, text)).await,
            Err(_) => self.bad_command(fixed::BAD_BYTES),
        }
    }

    async fn progress(&mut self, progress: Progress) -> Action {
        match progress {
            Progress::Challenge(text, step) => {
                self.auth_step = Some(step);
                Action::Challenge(text)
            }
            Progress::Cancelled => Action::Reply(fixed::AUTH_CANCELLED),
            Progress::Malformed => self.bad_command(fixed::SYNTAX),
            Progress::Credentials { user, password } => {
                let users = Arc::new(self.config.smtp.users.clone());
                let ip = self.peer.ip().to_canonical();
                match self.auth.verify(ip, users, user.clone(), password).await {
                    Verdict::Accepted => {
                        tracing::info!(peer = %self.peer, %user, "authenticated");
                        self.user = Some(user);
                        Action::Reply(fixed::AUTH_OK)
                    }
                    // Logged in aggregate by the gate, not one line per failure.
                    Verdict::Refused => self.bad_command(fixed::AUTH_FAILED),
                    Verdict::Limited | Verdict::Busy => self.bad_command(fixed::AUTH_BUSY),
                }
            }
        }
    }

    /// The first `campaign_from` source that yields, skipping headers (not seen yet).
    fn campaign_before_data(&self, sender: &str) -> Option<String> {
        self.config
            .smtp
            .campaign_from
            .iter()
            .find_map(|source| self.campaign_source(source, sender, None))
    }

    fn campaign_after_data(&self, envelope: &Envelope, body: &[u8]) -> Option<String> {
        self.config
            .smtp
            .campaign_from
            .iter()
            .find_map(|source| self.campaign_source(source, &envelope.sender, Some(body)))
    }

    fn campaign_source(&self, source: &str, sender: &str, body: Option<&[u8]>) -> Option<String> {
        match source {
            "auth" => self.user.clone(),
            "sender" => (!sender.is_empty()).then(|| sender.to_owned()),
            _ => {
                let name = source.strip_prefix("header:")?;
                message::header_value(body?, name).map(|v| message::campaign_name(&v))
            }
        }
        .filter(|c| !c.is_empty())
        .map(crate::campaign::unreserved)
    }
}

impl Drop for Session {
    /// A connection that ends mid-transaction (closed, timed out, dropped at shutdown)
    /// still owes its held refusals to a campaign.
    fn drop(&mut self) {
        self.end_transaction();
    }
}
