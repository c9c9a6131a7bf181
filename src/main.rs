//! The `floodgate` command line: `serve`, `check-config`, `hash-password`, `gen-key`,
//! `dkim-keygen`, `ctl`.
//! No logic lives here beyond turning arguments and signals into calls on the library.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use floodgate::app::{self, App, Deps};
use floodgate::config::{Config, LogFormat};
use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(
    name = "floodgate",
    version,
    about = "SMTP relay and webhook gateway appliance"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Serve {
        #[arg(long, short, default_value = "/etc/floodgate/floodgate.toml")]
        config: PathBuf,
    },
    /// Validate a config file; prints what is wrong and exits 2 if anything is.
    CheckConfig {
        #[arg(long, short, default_value = "/etc/floodgate/floodgate.toml")]
        config: PathBuf,
    },
    /// Read a password on standard input and print its Argon2 hash for `[[smtp.users]]`.
    HashPassword,
    /// Print a new random API key and the `key_sha256` line for `[[http.api_keys]]`.
    GenKey,
    /// Write a new DKIM private key (mode 0600) and print the DNS TXT record to publish.
    DkimKeygen {
        #[arg(long)]
        domain: String,
        #[arg(long)]
        selector: String,
        /// rsa-sha256 (RSA 2048) or ed25519-sha256.
        #[arg(long, default_value = "rsa-sha256", value_parser = parse_algorithm)]
        algorithm: floodgate::config::DkimAlgorithm,
        /// Folder the key is written to, as SELECTOR.DOMAIN.key.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Talk to a running daemon's admin API: campaigns, pause, purge, intake, failure log.
    Ctl(floodgate::ctl::CtlArgs),
}

/// Exit code for a config that cannot be used (sysexits' EX_USAGE is 64; systemd and
/// scripts here expect 2 for "bad configuration").
const EXIT_BAD_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => serve(&config),
        Command::CheckConfig { config } => check_config(&config),
        Command::HashPassword => hash_password(),
        Command::GenKey => gen_key(),
        Command::DkimKeygen {
            domain,
            selector,
            algorithm,
            out,
        } => dkim_keygen(&domain, &selector, algorithm, &out),
        Command::Ctl(args) => floodgate::ctl::main(args),
    }
}

/// Installs the subscriber for `[log] format`; once, so the format needs a restart.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        // One object per line, with its own timestamp: shippers parse it, not journald.
        LogFormat::Json => builder.json().with_ansi(false).init(),
        LogFormat::Text => {
            let builder = builder.with_ansi(std::io::stderr().is_terminal());
            // journald stamps every line itself; a second timestamp is noise.
            if std::env::var_os("JOURNAL_STREAM").is_some() {
                builder.without_time().init();
            } else {
                builder.init();
            }
        }
    }
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("floodgate: {e}");
        ExitCode::from(EXIT_BAD_CONFIG)
    })
}

fn check_config(path: &Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Err(e) = app::preflight(&config) {
        eprintln!("floodgate: {}: {e}", path.display());
        return ExitCode::from(EXIT_BAD_CONFIG);
    }
    println!("{}: OK", path.display());
    ExitCode::SUCCESS
}

fn hash_password() -> ExitCode {
    let mut line = String::new();
    if std::io::stdin().read_line(&mut line).is_err() || line.trim_end().is_empty() {
        eprintln!("floodgate: expected a password on standard input");
        return ExitCode::from(EXIT_BAD_CONFIG);
    }
    println!(
        "{}",
        floodgate::smtp::auth::hash_password(line.trim_end_matches(['\r', '\n']))
    );
    ExitCode::SUCCESS
}

fn gen_key() -> ExitCode {
    let bytes: [u8; 32] = rand::random();
    let key = format!("fg_{}", hex::encode(bytes));
    println!("key: {key}");
    println!("key_sha256 = \"{}\"", floodgate::http::api::key_hash(&key));
    eprintln!("Give the key to the integration; put only key_sha256 in the config.");
    ExitCode::SUCCESS
}

fn parse_algorithm(text: &str) -> Result<floodgate::config::DkimAlgorithm, String> {
    floodgate::config::DkimAlgorithm::parse(text)
        .ok_or_else(|| "use rsa-sha256 or ed25519-sha256".to_owned())
}

fn dkim_keygen(
    domain: &str,
    selector: &str,
    algorithm: floodgate::config::DkimAlgorithm,
    out: &Path,
) -> ExitCode {
    let table = floodgate::config::DkimConfig {
        domain: domain.to_owned(),
        selector: selector.to_owned(),
        key: out.join("x"),
        algorithm,
        headers: None,
        expire: None,
    };
    if let Err(why) = table.check() {
        eprintln!("floodgate: {why}");
        return ExitCode::from(EXIT_BAD_CONFIG);
    }
    match floodgate::dkim::keygen(domain, selector, algorithm, out) {
        Ok((path, record)) => {
            eprintln!("wrote {}", path.display());
            println!("{selector}._domainkey.{domain}. IN TXT \"{record}\"");
            eprintln!(
                "Publish the TXT record, then add to the config:\n[[dkim]]\ndomain = \"{domain}\"\nselector = \"{selector}\"\nkey = \"{}\"\nalgorithm = \"{}\"",
                path.display(),
                algorithm.as_str()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("floodgate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(path: &Path) -> ExitCode {
    // Read before the subscriber exists: a config that does not load is reported on
    // standard error by `load` itself.
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logging(config.log.format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("floodgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(path, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "floodgate stopped");
            ExitCode::FAILURE
        }
    }
}

async fn run(path: &Path, config: Config) -> anyhow::Result<()> {
    // Before the listeners open: a SIGTERM that arrives while the daemon starts waits for
    // the start to finish and then shuts down gracefully, instead of killing a process
    // that may already be answering requests.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let app = App::start(config, Deps::default()).await?;
    let _ = sd_notify::notify(false, &[NotifyState::Ready]);
    tracing::info!(config = %path.display(), "floodgate ready");
    let mut usec = 0;
    let watchdog =
        sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec) / 2);
    let mut tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => reload(&app, path),
            _ = tick.tick(), if watchdog.is_some() => {
                // Ping only while healthy: a dead task or a wedged queue writer means a
                // broken daemon, and systemd should restart it.
                match app.health(Duration::from_secs(10)).await {
                    Ok(()) => { let _ = sd_notify::notify(false, &[NotifyState::Watchdog]); }
                    Err(e) => tracing::error!(reason = %e, "unhealthy; withholding the watchdog ping"),
                }
            }
        }
    }
    let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
    tracing::info!("shutting down");
    app.shutdown().await;
    Ok(())
}

fn reload(app: &App, path: &Path) {
    let _ = sd_notify::notify(false, &[NotifyState::Reloading]);
    match Config::load(path)
        .map_err(|e| e.to_string())
        .and_then(|c| app.reload(c).map_err(|e| e.to_string()))
    {
        Ok(r) if r.applied.is_empty() && r.needs_restart.is_empty() => {
            tracing::info!("config reloaded: nothing changed")
        }
        Ok(r) => tracing::info!(
            changed = %r.applied.join(", "),
            needs_restart = %r.needs_restart.join(", "),
            "config reloaded"
        ),
        Err(e) => tracing::error!(error = %e, "config reload refused; the running config stays"),
    }
    let _ = sd_notify::notify(false, &[NotifyState::Ready]);
}
