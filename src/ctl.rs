//! `floodgate ctl`: the admin API from a shell — find the failing campaign, pause, purge,
//! resume it, pause intake, switch the failure log; and (in `ctl/mail.rs`) find one
//! message, retry, cancel, hold a domain, back up, requeue — with exit codes scripts can
//! rely on.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};
use hyper::Method;
use serde::Deserialize;
use serde_json::Value;

use crate::admin_api as api;

pub mod client;
pub mod mail;
pub mod render;

use client::{Client, CtlError, encode};

const DEFAULT_CONFIG: &str = "/etc/floodgate/floodgate.toml";
/// Where the daemon's admin listener is when the config does not say (`[admin] listen`).
const DEFAULT_ADMIN: &str = "127.0.0.1:8026";
const TOKEN_ENV: &str = "FLOODGATE_ADMIN_TOKEN";

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the admin API answered with an error (any non-2xx other than 401)
  2  usage or configuration error (bad arguments, unreadable config, no token,
     purge without --yes and without a terminal to confirm on)
  3  the daemon is unreachable (connection refused, timed out, broken connection)
  4  the admin token was refused (401)

The admin address and token come from --admin and --token, then FLOODGATE_ADMIN_TOKEN
(token only), then [admin] listen and [admin] token in the --config file, then the token
the daemon generated in <[queue] dir>/admin.token (a relative dir is taken from the
current folder, as the daemon does).";

#[derive(Args, Debug)]
#[command(after_help = EXIT_CODES)]
pub struct CtlArgs {
    /// Config file holding `[admin] listen` and `[admin] token`
    /// [default: /etc/floodgate/floodgate.toml].
    #[arg(long, short, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Admin API address, `HOST:PORT` (default: `[admin] listen` from the config).
    #[arg(long, global = true, value_name = "ADDR")]
    admin: Option<String>,
    /// Admin bearer token (default: $FLOODGATE_ADMIN_TOKEN, then `[admin] token`).
    #[arg(long, global = true, value_name = "TOKEN")]
    token: Option<String>,
    /// Print the API's JSON answer instead of a table (for scripts).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand, Debug)]
enum CtlCommand {
    /// Intake, queue depth, totals, held campaigns, failure log, alerts.
    Status,
    /// Every campaign, most failures first: state, accepted, failed, ratio, top reasons.
    Campaigns,
    /// Pause a campaign: its new mail is answered 451 4.7.1 and its queued mail waits.
    Pause { campaign: String },
    /// Resume a paused or blocked campaign.
    Resume { campaign: String },
    /// Delete every queued recipient of a campaign (asks for confirmation).
    Purge {
        campaign: String,
        /// First write what is removed to this new file (NDJSON, one message a line),
        /// synced to disk; `floodgate ctl requeue FILE` puts it back.
        #[arg(long, value_name = "FILE")]
        save: Option<PathBuf>,
        /// Also refuse the campaign's new mail for this long, e.g. `10m`, `1h`.
        #[arg(long, value_name = "DURATION")]
        block_for: Option<String>,
        /// Do not ask; required when not run from a terminal.
        #[arg(long, short)]
        yes: bool,
    },
    /// Pause or resume intake for every campaign (SMTP and HTTP answer 451 4.7.1).
    Intake { action: IntakeAction },
    /// Show the failure log's mode and write rate, or switch it.
    Faillog {
        /// New mode; omit to show the current settings.
        mode: Option<Mode>,
        /// Mode sampled: keep one event row in this many, per campaign.
        #[arg(long, value_name = "N")]
        sample_rate: Option<u32>,
        /// Modes full and sampled: most event rows per second per campaign.
        #[arg(long, value_name = "N")]
        rows_per_sec: Option<u32>,
    },
    /// Queued recipients by state, domain and campaign.
    Queue,
    /// Recent failure rows of a campaign, newest first.
    Failures {
        campaign: String,
        /// Only this reason, e.g. `no_such_domain`, `malformed_address`, `rejected`.
        #[arg(long)]
        reason: Option<String>,
        /// Most rows to show.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Guard alerts (failure ratios, failure-log write rate), newest first.
    Alerts,
    /// Webhook endpoints: disabled by `410 Gone` (their domains are answered 451 4.3.2
    /// until a config reload), circuit state, consecutive failures.
    Webhooks,
    /// TLS-RPT (RFC 8460): outbound MX sessions with working TLS and failures by type,
    /// per recipient domain and UTC day, and the daily reports sent.
    TlsReport {
        /// Only this recipient domain.
        #[arg(long)]
        domain: Option<String>,
        /// Send the reports due now (days before today not reported yet) instead of at
        /// the next minute's pass.
        #[arg(long)]
        send: bool,
    },
    #[command(flatten)]
    Mail(mail::MailCommand),
    /// Batch sends, newest first: rows received, accepted, rejected, delivered, queued.
    Batches,
    /// One batch send's progress, rejections by reason.
    Batch { id: String },
    /// The do-not-contact list: recipients refused at the door with 550 5.7.1.
    Suppressions {
        #[command(subcommand)]
        command: SuppressionsCommand,
    },
    /// Send a canary probe now through the whole path (door, queue, scheduler, courier)
    /// and print each stage's time: to confirm recovery after an incident.
    Probe {
        /// This address (its domain picks the route); default: every `[canary] probes`.
        #[arg(long, conflicts_with = "route")]
        address: Option<String>,
        /// The `[canary] probes` addresses that the route with this `name` serves.
        #[arg(long)]
        route: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum SuppressionsCommand {
    /// Entries, oldest first, one page (`--cursor` takes the last page's next cursor).
    List {
        /// Only this address (or `@domain` for a whole-domain entry).
        #[arg(long)]
        address: Option<String>,
        /// Only entries of this domain (addresses and the domain entry).
        #[arg(long)]
        domain: Option<String>,
        /// Only this reason, e.g. `invalid_recipient`, `unsubscribed`, `manual`.
        #[arg(long)]
        reason: Option<String>,
        /// Only entries of this campaign.
        #[arg(long)]
        campaign: Option<String>,
        #[arg(long)]
        cursor: Option<i64>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Suppress an address (or `@domain`), globally or for one campaign.
    Add {
        address: String,
        #[arg(long)]
        campaign: Option<String>,
        /// Default `manual`.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Lift an entry (the global one, or one campaign's with --campaign).
    Remove {
        address: String,
        #[arg(long)]
        campaign: Option<String>,
    },
    /// Import a file: NDJSON (`{"address": ...}` per line) or CSV (`.csv`, or --csv).
    Import {
        file: PathBuf,
        #[arg(long)]
        csv: bool,
    },
    /// Every entry as NDJSON on standard output, read page by page.
    Export,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum IntakeAction {
    Pause,
    Resume,
}

impl IntakeAction {
    fn word(self) -> &'static str {
        match self {
            IntakeAction::Pause => "pause",
            IntakeAction::Resume => "resume",
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Mode {
    Full,
    Sampled,
    Aggregate,
    Off,
}

impl Mode {
    fn api(self) -> api::FailLogMode {
        match self {
            Mode::Full => api::FailLogMode::Full,
            Mode::Sampled => api::FailLogMode::Sampled,
            Mode::Aggregate => api::FailLogMode::Aggregate,
            Mode::Off => api::FailLogMode::Off,
        }
    }
}

/// Runs one `ctl` command; the exit code is the documented one.
pub fn main(args: CtlArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("floodgate ctl: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("floodgate ctl: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

async fn run(args: CtlArgs) -> Result<String, CtlError> {
    let client = connect(&args)?;
    if let CtlCommand::Suppressions { command } = &args.command {
        match command {
            SuppressionsCommand::Import { file, csv } => {
                return import(&client, file, *csv, args.json).await;
            }
            SuppressionsCommand::Export => return export(&client).await,
            _ => {}
        }
    }
    let (answer, (method, path)) = match &args.command {
        CtlCommand::Mail(m) => mail::call(&client, m).await?,
        CtlCommand::Purge {
            campaign,
            save: Some(file),
            block_for,
            ..
        } => {
            // Checks the arguments and asks for confirmation, as a plain purge does.
            let call = request(&args.command)?;
            let answer = mail::purge_saving(&client, campaign, block_for.clone(), file).await?;
            (answer, (call.method, call.path))
        }
        command => {
            let call = request(command)?;
            let answer = client
                .call(call.method.clone(), &call.path, call.body)
                .await?;
            (answer, (call.method, call.path))
        }
    };
    if args.json {
        return Ok(serde_json::to_string_pretty(&answer).unwrap_or_default() + "\n");
    }
    // A daemon of another version may answer a shape this ctl does not know.
    human(&args.command, &client.addr, answer).map_err(|e| CtlError::Api {
        addr: client.addr.clone(),
        method,
        path,
        status: hyper::StatusCode::OK,
        message: format!("the answer does not match this ctl's admin API: {e}"),
    })
}

/// What a command asks of the admin API.
struct Call {
    method: Method,
    path: String,
    body: Option<Value>,
}

impl Call {
    fn get(path: impl Into<String>) -> Call {
        Call {
            method: Method::GET,
            path: path.into(),
            body: None,
        }
    }

    fn with(method: Method, path: impl Into<String>, body: Option<impl serde::Serialize>) -> Call {
        Call {
            method,
            path: path.into(),
            body: body.map(|b| serde_json::to_value(b).unwrap_or_default()),
        }
    }
}

/// The request of a command; a purge is checked and confirmed here, before it is sent.
fn request(command: &CtlCommand) -> Result<Call, CtlError> {
    const NONE: Option<()> = None;
    Ok(match command {
        CtlCommand::Status => Call::get("/admin/v1/status"),
        CtlCommand::Campaigns => Call::get("/admin/v1/campaigns"),
        CtlCommand::Pause { campaign } => {
            Call::with(Method::POST, campaign_path(campaign, "pause"), NONE)
        }
        CtlCommand::Resume { campaign } => {
            Call::with(Method::POST, campaign_path(campaign, "resume"), NONE)
        }
        CtlCommand::Purge {
            campaign,
            block_for,
            yes,
            ..
        } => {
            if let Some(d) = block_for {
                crate::config::duration::parse(d)
                    .map_err(|e| CtlError::Usage(format!("--block-for {d}: {e}")))?;
            }
            if !yes {
                confirm_purge(campaign, block_for.as_deref())?;
            }
            let body = api::PurgeRequest {
                block_for: block_for.clone(),
                through: None,
            };
            Call::with(Method::POST, campaign_path(campaign, "purge"), Some(body))
        }
        CtlCommand::Intake { action } => {
            let path = format!("/admin/v1/intake/{}", action.word());
            Call::with(Method::POST, path, NONE)
        }
        CtlCommand::Faillog {
            mode: None,
            sample_rate: None,
            rows_per_sec: None,
        } => Call::get("/admin/v1/faillog"),
        CtlCommand::Faillog {
            mode,
            sample_rate,
            rows_per_sec,
        } => {
            let body = api::FailLogUpdate {
                mode: mode.map(Mode::api),
                sample_rate: *sample_rate,
                rows_per_sec: *rows_per_sec,
                burst: None,
            };
            Call::with(Method::PUT, "/admin/v1/faillog", Some(body))
        }
        CtlCommand::Queue => Call::get("/admin/v1/queue"),
        CtlCommand::Failures {
            campaign,
            reason,
            limit,
        } => {
            let mut path = format!(
                "/admin/v1/failures?campaign={}&limit={limit}",
                encode(campaign)
            );
            if let Some(r) = reason {
                path.push_str(&format!("&reason={}", encode(r)));
            }
            Call::get(path)
        }
        CtlCommand::Alerts => Call::get("/admin/v1/alerts"),
        CtlCommand::Webhooks => Call::get("/admin/v1/webhooks"),
        CtlCommand::TlsReport { send: true, .. } => {
            Call::with(Method::POST, "/admin/v1/tls-report/send", None::<()>)
        }
        CtlCommand::TlsReport { domain, .. } => match domain {
            Some(d) => Call::get(format!("/admin/v1/tls-report?domain={}", encode(d))),
            None => Call::get("/admin/v1/tls-report"),
        },
        CtlCommand::Mail(_) => return Err(CtlError::Usage("runs in ctl::mail".into())),
        CtlCommand::Batches => Call::get("/admin/v1/batches"),
        CtlCommand::Batch { id } => Call::get(format!("/admin/v1/batches/{}", encode(id))),
        CtlCommand::Suppressions { command } => suppressions_request(command),
        CtlCommand::Probe { address, route } => Call::with(
            Method::POST,
            match (address, route) {
                (Some(a), _) => format!("/admin/v1/probe?address={}", encode(a)),
                (None, Some(r)) => format!("/admin/v1/probe?route={}", encode(r)),
                (None, None) => "/admin/v1/probe".to_owned(),
            },
            NONE,
        ),
    })
}

fn suppressions_request(command: &SuppressionsCommand) -> Call {
    match command {
        SuppressionsCommand::List {
            address,
            domain,
            reason,
            campaign,
            cursor,
            limit,
        } => {
            let mut path = format!("/admin/v1/suppressions?limit={limit}");
            let filters = [
                ("address", address.as_deref()),
                ("domain", domain.as_deref()),
                ("reason", reason.as_deref()),
                ("campaign", campaign.as_deref()),
            ];
            for (key, value) in filters {
                if let Some(v) = value {
                    path.push_str(&format!("&{key}={}", encode(v)));
                }
            }
            if let Some(c) = cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            Call::get(path)
        }
        SuppressionsCommand::Add {
            address,
            campaign,
            reason,
        } => Call::with(
            Method::POST,
            "/admin/v1/suppressions",
            Some(api::SuppressionAdd {
                address: address.clone(),
                campaign: campaign.clone(),
                reason: reason.clone(),
                expires_at_ms: None,
            }),
        ),
        SuppressionsCommand::Remove { address, campaign } => {
            let mut path = format!("/admin/v1/suppressions/{}", encode(address));
            if let Some(c) = campaign {
                path.push_str(&format!("?campaign={}", encode(c)));
            }
            Call::with(Method::DELETE, path, None::<()>)
        }
        // Handled in `run`: their bodies are not JSON.
        SuppressionsCommand::Import { .. } | SuppressionsCommand::Export => {
            Call::get("/admin/v1/suppressions?limit=1")
        }
    }
}

/// Sends `file` as the import's body and reports the counts.
async fn import(
    client: &Client,
    file: &Path,
    csv: bool,
    as_json: bool,
) -> Result<String, CtlError> {
    let body = std::fs::read(file)
        .map_err(|e| CtlError::Usage(format!("cannot read {}: {e}", file.display())))?;
    let csv = csv
        || file
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    let content_type = if csv {
        "text/csv"
    } else {
        "application/x-ndjson"
    };
    let path = "/admin/v1/suppressions/import";
    let answer = client
        .call_raw(Method::POST, path, content_type, body.into())
        .await?;
    if as_json {
        return Ok(serde_json::to_string_pretty(&answer).unwrap_or_default() + "\n");
    }
    let report: api::ImportReport = serde_json::from_value(answer).map_err(|e| CtlError::Api {
        addr: client.addr.clone(),
        method: Method::POST,
        path: path.into(),
        status: hyper::StatusCode::OK,
        message: format!("the answer does not match this ctl's admin API: {e}"),
    })?;
    Ok(render::import(&report))
}

/// Pages through the list with its cursor, so that neither side holds the whole list.
async fn export(client: &Client) -> Result<String, CtlError> {
    let mut cursor = None;
    let mut out = std::io::stdout().lock();
    loop {
        let mut path = "/admin/v1/suppressions?limit=10000".to_owned();
        if let Some(c) = cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let answer = client.get(&path).await?;
        let page: api::SuppressionsResponse =
            serde_json::from_value(answer).map_err(|e| CtlError::Api {
                addr: client.addr.clone(),
                method: Method::GET,
                path: path.clone(),
                status: hyper::StatusCode::OK,
                message: format!("the answer does not match this ctl's admin API: {e}"),
            })?;
        for entry in &page.suppressions {
            let line = serde_json::json!({
                "address": entry.address,
                "campaign": entry.campaign,
                "reason": entry.reason,
                "expires_at": entry.expires_at_ms,
            });
            writeln!(out, "{line}")
                .map_err(|e| CtlError::Usage(format!("cannot write the export: {e}")))?;
        }
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return Ok(String::new()),
        }
    }
}

/// The answer to a command, decoded into its admin API type and put in words.
fn human(command: &CtlCommand, addr: &str, answer: Value) -> Result<String, serde_json::Error> {
    use serde_json::from_value as decode;
    Ok(match command {
        CtlCommand::Status => render::status(addr, &decode(answer)?),
        CtlCommand::Campaigns => render::campaigns(&decode::<Vec<_>>(answer)?),
        CtlCommand::Pause { campaign } | CtlCommand::Resume { campaign } => {
            let done: api::CampaignActionResponse = decode(answer)?;
            format!("campaign {campaign}: {}\n", render::state(&done.campaign))
        }
        CtlCommand::Purge { campaign, .. } => {
            let done: api::CampaignActionResponse = decode(answer)?;
            format!(
                "campaign {campaign}: purged {} queued recipients; now {}\n",
                done.purged.unwrap_or(0),
                render::state(&done.campaign)
            )
        }
        CtlCommand::Intake { action } => {
            let _: api::IntakeResponse = decode(answer)?;
            match action {
                IntakeAction::Pause => "intake paused: new mail is answered 451 4.7.1 until `floodgate ctl intake resume`\n",
                IntakeAction::Resume => "intake resumed: accepting mail\n",
            }
            .to_owned()
        }
        CtlCommand::Faillog { .. } => render::faillog(&decode(answer)?),
        CtlCommand::Queue => render::queue(&decode(answer)?),
        CtlCommand::Failures { .. } => render::failures(&decode(answer)?),
        CtlCommand::Alerts => render::alerts(&decode::<Vec<_>>(answer)?),
        CtlCommand::Webhooks => render::webhooks(&decode(answer)?),
        CtlCommand::TlsReport { send: true, .. } => render::tls_reports_sent(&decode(answer)?),
        CtlCommand::TlsReport { .. } => render::tls_report(&decode(answer)?),
        CtlCommand::Mail(m) => mail::human(m, answer)?,
        CtlCommand::Batches => render::batches(&decode::<Vec<_>>(answer)?),
        CtlCommand::Batch { .. } => render::batch(&decode(answer)?),
        CtlCommand::Suppressions { command } => match command {
            SuppressionsCommand::Remove { address, .. } => {
                let _: api::SuppressionRemoved = decode(answer)?;
                format!("{address}: no longer suppressed\n")
            }
            _ => render::suppressions(&decode(answer)?),
        },
        CtlCommand::Probe { .. } => render::probes(&decode::<Vec<_>>(answer)?),
    })
}

pub(crate) fn campaign_path(campaign: &str, action: &str) -> String {
    format!("/admin/v1/campaigns/{}/{action}", encode(campaign))
}

/// A purge cannot be undone: ask on a terminal, refuse without one unless `--yes`.
fn confirm_purge(campaign: &str, block_for: Option<&str>) -> Result<(), CtlError> {
    if !std::io::stdin().is_terminal() {
        return Err(CtlError::Usage(format!(
            "purge of `{campaign}` not confirmed: pass --yes (standard input is not a terminal)"
        )));
    }
    let block = block_for
        .map(|d| format!(" and refuse its new mail for {d}"))
        .unwrap_or_default();
    confirm(&format!(
        "Purge every queued recipient of campaign `{campaign}`{block}? This cannot be undone."
    ))
}

/// Asks `question` on the terminal; anything but yes cancels (a usage error).
pub(crate) fn confirm(question: &str) -> Result<(), CtlError> {
    if !std::io::stdin().is_terminal() {
        return Err(CtlError::Usage(
            "not confirmed: pass --yes (standard input is not a terminal)".into(),
        ));
    }
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    let _ = std::io::stdin().lock().read_line(&mut answer);
    if matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
        Ok(())
    } else {
        Err(CtlError::Usage("cancelled".into()))
    }
}

/// Only the `[admin]` table is read, leniently: `ctl` must work with a config that a newer
/// or older daemon accepts, so the rest of the file is not validated here.
#[derive(Deserialize, Default)]
struct ConfigFile {
    #[serde(default)]
    admin: AdminSection,
    #[serde(default)]
    queue: QueueSection,
}

#[derive(Deserialize)]
struct QueueSection {
    #[serde(default = "default_state_dir")]
    dir: PathBuf,
}

impl Default for QueueSection {
    fn default() -> Self {
        QueueSection {
            dir: default_state_dir(),
        }
    }
}

fn default_state_dir() -> PathBuf {
    crate::config::QueueConfig::default().dir
}

#[derive(Deserialize, Default)]
struct AdminSection {
    listen: Option<String>,
    token: Option<String>,
}

/// Resolves the admin address and token: flags, then the environment, then the config.
fn connect(args: &CtlArgs) -> Result<Client, CtlError> {
    let env_token = std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty());
    let flag_token = args.token.clone().or(env_token);
    let explicit = args.config.is_some();
    let path = args.config.clone().unwrap_or_else(|| DEFAULT_CONFIG.into());
    // The file is only needed for what the flags do not give; an absent default file is
    // then no error.
    let file = if flag_token.is_some() && args.admin.is_some() && !explicit {
        ConfigFile::default()
    } else {
        match read_config(&path) {
            Ok(f) => f,
            Err(e) if explicit || flag_token.is_none() => return Err(e),
            Err(_) => ConfigFile::default(),
        }
    };
    let token = match flag_token.or(file.admin.token).filter(|t| !t.is_empty()) {
        Some(t) => t,
        // The daemon generated one into its state directory.
        None => crate::config::token::read(&file.queue.dir)
            .map_err(|e| CtlError::Usage(e.to_string()))?
            .ok_or_else(|| {
                CtlError::Usage(format!(
                    "no admin token: pass --token, set {TOKEN_ENV}, set [admin] token in {}, or start the daemon once to generate {}",
                    path.display(),
                    crate::config::token::path(&file.queue.dir).display()
                ))
            })?,
    };
    let addr = match (&args.admin, file.admin.listen) {
        (Some(a), _) => a.clone(),
        (None, Some(listen)) => loopback_for(&listen),
        (None, None) => DEFAULT_ADMIN.to_owned(),
    };
    let addr = addr
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    if !addr.contains(':') {
        return Err(CtlError::Usage(format!(
            "admin address `{addr}`: expected HOST:PORT, e.g. 127.0.0.1:8026"
        )));
    }
    Ok(Client::new(addr, token))
}

fn read_config(path: &Path) -> Result<ConfigFile, CtlError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::PermissionDenied => {
                " (run as root or the floodgate group, or pass --token)"
            }
            std::io::ErrorKind::NotFound => " (pass --config PATH, or --admin and --token)",
            _ => "",
        };
        CtlError::Usage(format!("cannot read {}: {e}{hint}", path.display()))
    })?;
    toml::from_str(&text).map_err(|e| CtlError::Usage(format!("{}: {e}", path.display())))
}

/// A daemon listening on every address (`0.0.0.0`, `[::]`) is reached on loopback.
fn loopback_for(listen: &str) -> String {
    match listen.parse::<std::net::SocketAddr>() {
        Ok(a) if a.ip().is_unspecified() => {
            let ip: std::net::IpAddr = if a.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            };
            std::net::SocketAddr::new(ip, a.port()).to_string()
        }
        _ => listen.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_listen_addresses_are_reached_on_loopback() {
        assert_eq!(loopback_for("0.0.0.0:8026"), "127.0.0.1:8026");
        assert_eq!(loopback_for("[::]:8026"), "[::1]:8026");
        assert_eq!(loopback_for("10.0.0.5:8026"), "10.0.0.5:8026");
    }

    #[test]
    fn only_the_admin_table_is_read() {
        let f: ConfigFile = toml::from_str(
            "[smtp]\nsomething_new = 1\n[admin]\nlisten = \"127.0.0.1:9\"\ntoken = \"t\"\n",
        )
        .unwrap();
        assert_eq!(f.admin.listen.as_deref(), Some("127.0.0.1:9"));
        assert_eq!(f.admin.token.as_deref(), Some("t"));
    }
}
