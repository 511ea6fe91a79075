//! The command line: `serve` (the default) and `sign`, and the operator's client tools
//! `replay`, `tail` and `events`.
//!
//! Flags are the top layer of the configuration: each `serve` flag overrides the file and the
//! environment for its one setting (see [`crate::config`]). The client tools read the same
//! layers, so that on the host the service runs on they find its ports, broker, secret and
//! admin token without being told.
//!
//! Exit codes, for scripts: 0 the work was done, 1 the work failed (a request not answered
//! 2xx, a server or broker that cannot be reached, an error answer), 2 the command line or the
//! input is wrong (clap answers its own usage errors with 2 as well).

/// `println!` for the client commands, returning `Result<(), Failure>`: a reader that went
/// away (`kallina-relay events list | head`) ends the output quietly, where `println!` would
/// panic on the closed pipe.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::write_line(format_args!($($arg)*))
    };
}

mod events;
mod replay;
mod tail;

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{IsTerminal, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::{ConfigError, Layers};
use crate::settings::{self, Settings};
use crate::signature;

pub use events::{EventsArgs, EventsCommand};
pub use replay::ReplayArgs;
pub use tail::TailArgs;

#[derive(Debug, Parser)]
#[command(
    name = "kallina-relay",
    version,
    about = "Receives Kallina.ai webhooks, stores them durably and relays them to RabbitMQ"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the webhook receiver and relay (the default).
    Serve(Box<ServeArgs>),
    /// Print the X-Kallina-Signature value for a file (or standard input), as the platform would.
    Sign(SignArgs),
    /// Sign payload files as the platform would, POST them to a receiver, summarise the answers.
    Replay(ReplayArgs),
    /// Print the events passing through the broker's exchange, as they pass.
    Tail(TailArgs),
    /// Look stored events up and publish them again, through the admin API.
    Events(EventsArgs),
}

/// The `serve` flags: `--config`, and one flag for each setting declared with one (see
/// [`crate::settings::all`]); each overrides the same setting from the file and the environment.
/// Built from the declarations rather than derived, so that a setting is named in one place.
#[derive(Debug, Default, Clone)]
pub struct ServeArgs {
    /// TOML configuration file (also KALLINA_RELAY_CONFIG).
    pub config: Option<PathBuf>,
    /// The flag layer of the configuration, by setting key.
    pub flags: BTreeMap<&'static str, String>,
}

const CONFIG_FLAG: &str = "config";

impl Args for ServeArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        let config = clap::Arg::new(CONFIG_FLAG)
            .long(CONFIG_FLAG)
            .global(true)
            .value_name("PATH")
            .value_parser(clap::value_parser!(PathBuf))
            .help("TOML configuration file (also KALLINA_RELAY_CONFIG)");
        settings::all()
            .filter(|spec| spec.flag)
            .fold(cmd.arg(config), |cmd, spec| {
                let mut help = spec.help.to_string();
                if let Some(default) = spec.default {
                    help.push_str(&format!(" [default: {default}]"));
                }
                cmd.arg(
                    clap::Arg::new(spec.key)
                        .long(spec.flag_name())
                        .value_name("VALUE")
                        .help(help),
                )
            })
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl clap::FromArgMatches for ServeArgs {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut args = Self::default();
        args.update_from_arg_matches(matches)?;
        Ok(args)
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        if let Some(path) = matches.get_one::<PathBuf>(CONFIG_FLAG) {
            self.config = Some(path.clone());
        }
        for spec in settings::all().filter(|spec| spec.flag) {
            if let Some(value) = matches.get_one::<String>(spec.key) {
                self.flags.insert(spec.key, value.clone());
            }
        }
        Ok(())
    }
}

impl ServeArgs {
    /// All layers merged and validated.
    pub fn settings(&self) -> Result<Settings, ConfigError> {
        Settings::load(&Layers::from_process(
            self.config.as_deref(),
            self.flags.clone(),
        )?)
    }
}

#[derive(Debug, Args)]
pub struct SignArgs {
    /// File to sign; standard input when absent or `-`.
    pub file: Option<PathBuf>,
    /// Webhook secret (else the first of KALLINA_WEBHOOK_SECRET).
    #[arg(long, env = "KALLINA_WEBHOOK_SECRET", hide_env_values = true)]
    pub secret: String,
}

/// `kallina-relay sign`: the header value for the given bytes.
pub fn sign(args: &SignArgs) -> anyhow::Result<String> {
    let body = match args.file.as_deref() {
        None => read_stdin()?,
        Some(p) if p.as_os_str() == "-" => read_stdin()?,
        Some(p) => {
            std::fs::read(p).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?
        }
    };
    // The environment may hold a rotation list; the platform signs with the first (newest).
    let secret = args
        .secret
        .split(',')
        .map(str::trim)
        .next()
        .unwrap_or_default();
    anyhow::ensure!(
        !secret.is_empty(),
        "the secret is empty: pass --secret or set KALLINA_WEBHOOK_SECRET"
    );
    Ok(signature::sign(secret.as_bytes(), &body))
}

fn read_stdin() -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::new();
    std::io::stdin().read_to_end(&mut body)?;
    Ok(body)
}

/// Why a client command failed; decides the exit code.
#[derive(Debug)]
pub enum Failure {
    /// The command line, the input or the configuration is wrong: exit 2, like clap's own
    /// usage errors, so that a script can tell "fix the call" from "try again later".
    Usage(String),
    /// The work itself failed: exit 1.
    Work(String),
}

impl Failure {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Self::Usage(_) => ExitCode::from(2),
            Self::Work(_) => ExitCode::from(1),
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Self::Usage(m) | Self::Work(m) => m,
        }
    }
}

/// Runs a client command (`replay`, `tail`, `events`) to its end; `global` holds the flags
/// given before the subcommand (`--config`, `--listen`, …), the top layer of the settings.
/// `serve` and `sign` are not client commands: they are run by the binary itself.
pub fn run_client(command: Command, global: &ServeArgs) -> ExitCode {
    type Work<'a> = Pin<Box<dyn Future<Output = Result<(), Failure>> + 'a>>;
    let (name, work): (&str, Work) = match command {
        Command::Replay(args) => ("replay", Box::pin(replay::run(args, global))),
        Command::Tail(args) => ("tail", Box::pin(tail::run(args, global))),
        Command::Events(args) => ("events", Box::pin(events::run(args, global))),
        Command::Serve(_) | Command::Sign(_) => {
            unreachable!("serve and sign are run by the binary, not as client commands")
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("kallina-relay {name}: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(work);
    // Tasks still waiting on the network (a tail's consumer, a slow request) must not hold
    // the exit back once the command has decided how it ends.
    runtime.shutdown_timeout(Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("kallina-relay {name}: {}", failure.message());
            failure.exit_code()
        }
    }
}

/// The service's settings, as a client command on the same host sees them.
///
/// `Settings::load` insists on a webhook secret, which only `replay` needs: the others pass
/// `need_secret = false` and get a placeholder in its place when none is configured, so that
/// `tail` or `events` work from a shell that has the broker URL or admin port but not the
/// secret.
pub(crate) fn client_settings(global: &ServeArgs, need_secret: bool) -> Result<Settings, Failure> {
    let config_error = |e: ConfigError| Failure::Usage(e.to_string());
    let mut layers = Layers::from_process(global.config.as_deref(), global.flags.clone())
        .map_err(config_error)?;
    match Settings::load(&layers) {
        Err(ConfigError::MissingSecret) if !need_secret => {
            layers.env.insert(
                "KALLINA_WEBHOOK_SECRET".into(),
                "placeholder: not used by client commands".into(),
            );
            Settings::load(&layers).map_err(config_error)
        }
        other => other.map_err(config_error),
    }
}

/// An address a client can connect to for a listen address: the unspecified address
/// (`0.0.0.0`, `::`) means every interface, so the loopback one of the same family is used.
pub(crate) fn connectable(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port()).to_string()
}

/// A progress bar on standard error, hidden unless a person is watching: when stderr is
/// redirected to a file or a pipe, escape sequences would only garble it.
pub(crate) fn progress_bar(len: Option<u64>, template: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match len {
        Some(len) => ProgressBar::new(len),
        None => ProgressBar::new_spinner(),
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// One line on standard output; see [`out!`].
pub(crate) fn write_line(args: std::fmt::Arguments) -> Result<(), Failure> {
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_fmt(args)
        .and_then(|()| stdout.write_all(b"\n"))
        .and_then(|()| stdout.flush());
    match written {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Failure::Work(format!(
            "cannot write to standard output: {e}"
        ))),
    }
}

/// An error with its causes, on one line: reqwest's own message stops at "error sending
/// request", the reason (refused, reset, certificate) is further down the chain.
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = cause.source();
    }
    text
}
