//! SMTP half of the harness self-test: `common::sink` against a raw client, a tokio-rustls
//! STARTTLS client and lettre.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::common::sink::{RcptScript, Sink, SinkConfig, self_signed};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Minimal SMTP client: sends raw bytes, reads complete (multi-line) replies.
struct Client<S> {
    io: BufReader<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// One full reply: (code, joined text lines). Panics on EOF.
    async fn reply(&mut self) -> (u16, String) {
        self.try_reply().await.expect("connection closed")
    }

    async fn try_reply(&mut self) -> Option<(u16, String)> {
        let mut text = Vec::new();
        loop {
            let mut line = String::new();
            if self.io.read_line(&mut line).await.ok()? == 0 {
                return None;
            }
            let code = line[..3].parse().unwrap();
            text.push(line[4..].trim_end().to_string());
            if line.as_bytes()[3] == b' ' {
                return Some((code, text.join("\n")));
            }
        }
    }

    async fn send(&mut self, raw: &str) {
        self.io.get_mut().write_all(raw.as_bytes()).await.unwrap();
        self.io.get_mut().flush().await.unwrap();
    }

    async fn cmd(&mut self, line: &str) -> (u16, String) {
        self.send(&format!("{line}\r\n")).await;
        self.reply().await
    }
}

async fn connect(addr: SocketAddr) -> Client<TcpStream> {
    Client {
        io: BufReader::new(TcpStream::connect(addr).await.unwrap()),
    }
}

#[tokio::test]
async fn sink_pipelining_dot_stuffing_and_reuse() {
    let sink = Sink::start().await;
    let mut c = connect(sink.addr).await;
    assert_eq!(c.reply().await.0, 220);
    let (code, caps) = c.cmd("EHLO client.test").await;
    assert_eq!(code, 250);
    for cap in ["PIPELINING", "8BITMIME", "SIZE", "ENHANCEDSTATUSCODES"] {
        assert!(caps.contains(cap), "{caps}");
    }
    assert!(!caps.contains("STARTTLS") && !caps.contains("AUTH"));

    // Whole transaction in one write (RFC 2920), replies in order.
    c.send(
        "MAIL FROM:<a@x.test> BODY=8BITMIME\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>\r\nDATA\r\n",
    )
    .await;
    for want in [250, 250, 250, 354] {
        assert_eq!(c.reply().await.0, want);
    }
    c.send("Subject: hi\r\n\r\n..leading dot\r\n.\r\n").await;
    assert_eq!(c.reply().await, (250, "2.0.0 OK".into()));

    // Second transaction on the same connection, with RSET / NOOP and the null sender.
    assert_eq!(c.cmd("NOOP").await.0, 250);
    assert_eq!(c.cmd("MAIL FROM:<x@x.test>").await.0, 250);
    assert_eq!(c.cmd("RSET").await.0, 250);
    assert_eq!(c.cmd("RCPT TO:<b@y.test>").await.0, 503);
    assert_eq!(c.cmd("MAIL FROM:<>").await.0, 250);
    assert_eq!(c.cmd("RCPT TO:<d@y.test>").await.0, 250);
    assert_eq!(c.cmd("DATA").await.0, 354);
    c.send("second\r\n.\r\n").await;
    assert_eq!(c.reply().await.0, 250);
    assert_eq!(c.cmd("QUIT").await.0, 221);

    let got = sink.wait_for(2, Duration::from_secs(2)).await;
    assert_eq!(got[0].mail_from, "a@x.test");
    assert_eq!(got[0].rcpts, ["b@y.test", "c@y.test"]);
    assert_eq!(got[0].data, b"Subject: hi\r\n\r\n.leading dot\r\n");
    assert!(!got[0].tls && got[0].auth_user.is_none());
    assert_eq!(got[0].helo, "client.test");
    assert_eq!(got[1].mail_from, "");
    assert_eq!(got[1].rcpts, ["d@y.test"]);
    assert_eq!(got[1].data, b"second\r\n");
    assert_eq!(sink.connections(), 1);
    assert!(sink.commands().contains(&"RSET".to_string()));
}

#[tokio::test]
async fn sink_rcpt_script_and_data_reply() {
    let sink = Sink::start_with(SinkConfig {
        bind_ip: Ipv4Addr::new(127, 0, 0, 2),
        rcpt: Box::new(|r| match r {
            "full@y.test" => RcptScript::Reply(452, "4.2.2 mailbox full"),
            "gone@y.test" => RcptScript::Reply(550, "5.1.1 no such user"),
            _ => RcptScript::Accept,
        }),
        data_reply: (451, "4.3.0 try again".into()),
        ..Default::default()
    })
    .await;
    assert_eq!(sink.addr.ip().to_string(), "127.0.0.2");
    let mut c = connect(sink.addr).await;
    c.reply().await;
    c.cmd("HELO client.test").await;
    c.cmd("MAIL FROM:<a@x.test>").await;
    assert_eq!(
        c.cmd("RCPT TO:<full@y.test>").await,
        (452, "4.2.2 mailbox full".into())
    );
    assert_eq!(c.cmd("RCPT TO:<gone@y.test>").await.0, 550);
    assert_eq!(c.cmd("DATA").await.0, 554, "no valid recipients");
    assert_eq!(c.cmd("RCPT TO:<ok@y.test>").await.0, 250);
    assert_eq!(c.cmd("DATA").await.0, 354);
    c.send("x\r\n.\r\n").await;
    assert_eq!(c.reply().await, (451, "4.3.0 try again".into()));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(sink.received().is_empty(), "4xx DATA reply is not recorded");
}

#[tokio::test]
async fn sink_failure_injection() {
    // Drop mid-DATA: the client sees EOF instead of a reply.
    let sink = Sink::start_with(SinkConfig {
        drop_mid_data: true,
        ..Default::default()
    })
    .await;
    let mut c = connect(sink.addr).await;
    c.reply().await;
    c.cmd("EHLO c").await;
    c.cmd("MAIL FROM:<a@x.test>").await;
    c.cmd("RCPT TO:<b@y.test>").await;
    assert_eq!(c.cmd("DATA").await.0, 354);
    c.send("Subject: x\r\n\r\nbody\r\n.\r\n").await;
    assert!(c.try_reply().await.is_none());
    assert!(sink.received().is_empty());

    // Stall after the final dot.
    let sink = Sink::start_with(SinkConfig {
        stall_on_data: Some(Duration::from_secs(5)),
        ..Default::default()
    })
    .await;
    let mut c = connect(sink.addr).await;
    c.reply().await;
    c.cmd("EHLO c").await;
    c.cmd("MAIL FROM:<a@x.test>").await;
    c.cmd("RCPT TO:<b@y.test>").await;
    c.cmd("DATA").await;
    c.send("x\r\n.\r\n").await;
    let r = tokio::time::timeout(Duration::from_millis(300), c.try_reply()).await;
    assert!(r.is_err(), "expected silence, got {r:?}");

    // Stall after greeting.
    let sink = Sink::start_with(SinkConfig {
        stall_after_greeting: Some(Duration::from_secs(5)),
        ..Default::default()
    })
    .await;
    let mut c = connect(sink.addr).await;
    assert_eq!(c.reply().await.0, 220);
    c.send("EHLO c\r\n").await;
    let r = tokio::time::timeout(Duration::from_millis(300), c.try_reply()).await;
    assert!(r.is_err(), "expected silence, got {r:?}");

    // 554 banner: everything but QUIT gets 503.
    let sink = Sink::start_with(SinkConfig {
        greeting: (554, "5.7.1 go away".into()),
        ..Default::default()
    })
    .await;
    let mut c = connect(sink.addr).await;
    assert_eq!(c.reply().await, (554, "5.7.1 go away".into()));
    assert_eq!(c.cmd("EHLO c").await.0, 503);
    assert_eq!(c.cmd("QUIT").await.0, 221);

    // 421 banner: closed right after.
    let sink = Sink::start_with(SinkConfig {
        greeting: (421, "4.3.2 busy".into()),
        ..Default::default()
    })
    .await;
    let mut c = connect(sink.addr).await;
    assert_eq!(c.reply().await.0, 421);
    assert!(c.try_reply().await.is_none());
}

fn tls_client(cert_pem: &str) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(cert_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

#[tokio::test]
async fn sink_starttls_and_auth() {
    let (cert, key) = self_signed(&["mx.sink.test", "127.0.0.1"]);
    let sink = Sink::start_with(SinkConfig {
        tls: Some((cert.clone(), key)),
        auth: Some(("user".into(), "secret".into())),
        ..Default::default()
    })
    .await;

    let mut c = connect(sink.addr).await;
    c.reply().await;
    let (_, caps) = c.cmd("EHLO client.test").await;
    assert!(
        caps.contains("STARTTLS") && !caps.contains("AUTH"),
        "{caps}"
    );
    assert_eq!(c.cmd("AUTH PLAIN AHVzZXIAc2VjcmV0").await.0, 530);
    assert_eq!(c.cmd("MAIL FROM:<a@x.test>").await.0, 530);
    assert_eq!(c.cmd("STARTTLS").await.0, 220);

    let name = ServerName::try_from("mx.sink.test").unwrap();
    let tls = tls_client(&cert)
        .connect(name, c.io.into_inner())
        .await
        .expect("TLS handshake with self-signed cert");
    let mut c = Client {
        io: BufReader::new(tls),
    };
    let (_, caps) = c.cmd("EHLO client.test").await;
    assert!(caps.contains("AUTH PLAIN LOGIN") && !caps.contains("STARTTLS"));
    // Wrong password, then AUTH LOGIN (two-step), then a message.
    assert_eq!(c.cmd("AUTH PLAIN AHVzZXIAd3Jvbmc=").await.0, 535);
    assert_eq!(c.cmd("AUTH LOGIN").await.0, 334);
    assert_eq!(c.cmd("dXNlcg==").await.0, 334);
    assert_eq!(c.cmd("c2VjcmV0").await.0, 235);
    assert_eq!(c.cmd("MAIL FROM:<a@x.test>").await.0, 250);
    assert_eq!(c.cmd("RCPT TO:<b@y.test>").await.0, 250);
    assert_eq!(c.cmd("DATA").await.0, 354);
    c.send("secret stuff\r\n.\r\n").await;
    assert_eq!(c.reply().await.0, 250);
    c.cmd("QUIT").await;

    let got = sink.wait_for(1, Duration::from_secs(2)).await;
    assert!(got[0].tls);
    assert_eq!(got[0].auth_user.as_deref(), Some("user"));
}

#[tokio::test]
async fn sink_receives_from_lettre() {
    use lettre::transport::smtp::authentication::Credentials;
    use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
    use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

    // Plain.
    let sink = Sink::start().await;
    let mailer = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(sink.addr.port())
        .build();
    let msg = Message::builder()
        .from("Alice <alice@x.test>".parse().unwrap())
        .to("bob@y.test".parse().unwrap())
        .subject("hello")
        .body(String::from(".dot first\nsecond line\n"))
        .unwrap();
    mailer.send(msg.clone()).await.expect("lettre send");
    let got = sink.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(got[0].mail_from, "alice@x.test");
    assert_eq!(got[0].rcpts, ["bob@y.test"]);
    let text = String::from_utf8_lossy(&got[0].data);
    assert!(text.contains("Subject: hello"), "{text}");
    assert!(text.contains("\r\n.dot first\r\n"), "unstuffed: {text}");

    // STARTTLS required + AUTH, trusting the self-signed cert.
    let (cert, key) = self_signed(&["mx.sink.test"]);
    let sink = Sink::start_with(SinkConfig {
        tls: Some((cert.clone(), key)),
        auth: Some(("user".into(), "secret".into())),
        ..Default::default()
    })
    .await;
    let tls = TlsParameters::builder("mx.sink.test".into())
        .add_root_certificate(Certificate::from_pem(cert.as_bytes()).unwrap())
        .build_rustls()
        .unwrap();
    let mailer = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(sink.addr.port())
        .tls(Tls::Required(tls))
        .credentials(Credentials::new("user".into(), "secret".into()))
        .build();
    mailer.send(msg).await.expect("lettre STARTTLS+AUTH send");
    let got = sink.wait_for(1, Duration::from_secs(5)).await;
    assert!(got[0].tls);
    assert_eq!(got[0].auth_user.as_deref(), Some("user"));
}
