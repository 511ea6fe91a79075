//! The `kallina-relay` binary: parses the command line and hands over to the library.

use std::process::ExitCode;

// sled allocates for every node it rewrites; glibc's malloc showed as the hottest symbol of the
// store writer under load, mimalloc took a measured share of that back. It is built with
// `no_thp` (Cargo.toml): otherwise it asks for transparent huge pages on its arenas, and every
// 2 MiB page touched counts whole in RSS (55 MB of 67 at idle; 158-174 MB against 94-124 MB
// ingesting, with the same throughput).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use kallina_relay::cli::{self, Cli, Command, ServeArgs};
use kallina_relay::startup::Application;
use kallina_relay::{shutdown, telemetry};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Sign(args)) => match cli::sign(&args) {
            Ok(header) => {
                println!("{header}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("kallina-relay sign: {e}");
                ExitCode::from(1)
            }
        },
        Some(Command::Serve(args)) => serve(&args),
        Some(client) => cli::run_client(client, &cli.serve),
        None => serve(&cli.serve),
    }
}

fn serve(args: &ServeArgs) -> ExitCode {
    let settings = match args.settings() {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("kallina-relay: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(settings.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kallina-relay: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        let app = Application::build(settings)?;
        let trigger = app.shutdown_trigger();
        tokio::spawn(async move {
            shutdown::os_signal().await;
            trigger.trigger();
        });
        app.run_until_stopped().await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "kallina-relay stopped on an error");
            eprintln!("kallina-relay: {e:#}");
            ExitCode::from(1)
        }
    }
}
