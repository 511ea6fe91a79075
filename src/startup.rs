//! Wiring: builds every stage from [`Settings`], binds both listeners, and runs the whole until
//! the shutdown signal, then stops the stages in the order that keeps the promises:
//!
//! 1. new webhook requests get 503 (`shutting_down`), the public listener stops accepting and
//!    in-flight requests finish;
//! 2. the relay stops publishing and waits (up to the grace period) for outstanding confirms;
//!    any redrive stops (a task that panicked is logged);
//! 3. the store stops its own maintenance thread, flushes and closes; the admin listener stops
//!    last.
//!
//! One signal reaches them all: the [`Shutdown`] watch, fired by the trigger (SIGTERM/SIGINT in
//! the binary, a call in tests) or by the public listener failing. Every request handler and
//! task reads that same signal; nothing polls for it.

use std::net::TcpListener;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::{web, App, HttpServer};
use anyhow::Context;
use tokio::task::JoinSet;
use tokio_util::task::TaskTracker;

use crate::admin::Publishing;
use crate::admin::{self, Admin};
use crate::ingress::{self, Ingress};
use crate::metrics::Metrics;
use crate::relay::{BrokerStatus, Relay};
use crate::settings::Settings;
use crate::shutdown::{self, Shutdown, ShutdownTrigger};
use crate::store::Store;
use crate::telemetry::Spans;

/// Body limit of the admin listener: only small JSON requests (a redrive's filter).
const ADMIN_MAX_BODY: usize = 64 * 1024;

/// A built, bound, not yet running service.
pub struct Application {
    public_port: u16,
    admin_port: u16,
    public: Server,
    admin: Server,
    store: Store,
    relay: Relay,
    settings: Settings,
    /// Span export, flushed last.
    spans: Spans,
    /// Tasks the admin API starts (redrives), awaited when stopping.
    admin_tasks: TaskTracker,
    trigger: ShutdownTrigger,
    shutdown: Shutdown,
}

impl Application {
    /// Opens the store and binds both listeners (port 0 picks a free port: tests use that).
    pub fn build(settings: Settings) -> anyhow::Result<Self> {
        let store = Store::open(&settings.store)?;
        let metrics = Metrics::new();
        metrics.seed_sources(settings.ingress.sources.iter().map(|s| s.name.as_str()));
        let spans = match &settings.otlp {
            Some(otlp) => Spans::start(otlp)?,
            None => Spans::off(),
        };
        let broker = BrokerStatus::default();
        let (trigger, shutdown) = shutdown::channel();
        let admin_tasks = TaskTracker::new();

        let (listener, public_port) = bind(settings.ingress.listen, "KALLINA_RELAY_LISTEN")?;
        let ingress = web::Data::new(Ingress::new(
            &settings.ingress,
            store.clone(),
            metrics.clone(),
            spans.clone(),
            shutdown.clone(),
        ));
        // One HTTP worker per core, as actix would choose; the count is needed for the cap.
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        let public = HttpServer::new(move || {
            // No middleware: the handler sets `X-Request-Id` on its answers itself (see ingress).
            App::new()
                .app_data(ingress.clone())
                .configure(|cfg| ingress.routes(cfg))
        })
        .workers(workers)
        .on_connect(ingress::remember_connection)
        // actix counts per worker; idle connections that send no request are dropped after
        // its 5 s request-head timeout, so they free their slot for real clients.
        .max_connections(settings.ingress.max_connections.div_ceil(workers))
        .disable_signals()
        .shutdown_timeout(settings.shutdown_grace.as_secs().max(1));
        let public = match &settings.ingress.tls {
            Some(files) => {
                public.listen_rustls_0_23(listener, ingress::tls_server_config(files)?)?
            }
            None => public.listen(listener)?,
        }
        .run();

        let (admin_listener, admin_port) =
            bind(settings.admin.listen, "KALLINA_RELAY_ADMIN_LISTEN")?;
        if settings.admin.token.is_none() {
            tracing::info!(
                "admin API off: set KALLINA_RELAY_ADMIN_TOKEN to turn on /admin/ (events, redrive)"
            );
        }
        let admin_state = web::Data::new(Admin {
            store: store.clone(),
            metrics: metrics.clone(),
            broker: broker.clone(),
            shutdown: shutdown.clone(),
            tasks: admin_tasks.clone(),
            options: settings.admin.clone(),
            publishing: Publishing {
                exchange: settings.relay.topology.exchange.clone(),
                routing_key: settings.relay.routing_key.clone(),
            },
        });
        let admin = HttpServer::new(move || {
            App::new()
                .app_data(admin_state.clone())
                .app_data(web::PayloadConfig::new(ADMIN_MAX_BODY))
                .configure(admin::routes)
        })
        .workers(1)
        .disable_signals()
        .shutdown_timeout(1)
        .listen(admin_listener)?
        .run();

        let relay = Relay::new(
            store.clone(),
            settings.relay.clone(),
            metrics,
            broker,
            spans.clone(),
        );
        Ok(Self {
            public_port,
            admin_port,
            public,
            admin,
            store,
            relay,
            settings,
            spans,
            admin_tasks,
            trigger,
            shutdown,
        })
    }

    pub fn port(&self) -> u16 {
        self.public_port
    }

    pub fn admin_port(&self) -> u16 {
        self.admin_port
    }

    /// Fires the shutdown (the binary connects it to SIGTERM/SIGINT; tests call it directly).
    pub fn shutdown_trigger(&self) -> ShutdownTrigger {
        self.trigger.clone()
    }

    /// Runs until the shutdown trigger fires or a listener fails, then stops in order.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let Self {
            public,
            admin,
            store,
            relay,
            settings,
            spans,
            admin_tasks,
            trigger,
            mut shutdown,
            ..
        } = self;
        let public_handle = public.handle();
        let admin_handle = admin.handle();
        let mut public_task = tokio::spawn(public);
        let admin_task = tokio::spawn(admin);
        let mut tasks = JoinSet::new();
        tasks.spawn(relay.run(shutdown.clone()));
        tracing::info!(settings = %settings.summary(), "kallina-relay serving");

        let early_exit = tokio::select! {
            _ = shutdown.recv() => None,
            result = &mut public_task => Some(result),
        };
        tracing::info!("shutting down: finishing in-flight requests");
        // Already fired unless the public listener failed: then this is what stops the rest.
        trigger.trigger();
        public_handle.stop(true).await;
        let public_result = match early_exit {
            Some(result) => result,
            None => public_task.await,
        };
        while let Some(finished) = tasks.join_next().await {
            if let Err(e) = finished {
                tracing::error!(error = %e, "a background task failed");
            }
        }
        admin_tasks.close();
        if tokio::time::timeout(settings.shutdown_grace, admin_tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("an admin task did not stop within the grace period");
        }
        let stats = store.stats();
        store.close();
        tracing::info!(
            outbox_events = stats.outbox_events,
            "store flushed and closed"
        );
        admin_handle.stop(true).await;
        let _ = admin_task.await;
        spans.shutdown();
        // "Stopped" means the data directory is free for the next process (or, in tests, the
        // next application in this one): wait for the workers' handles to go too.
        let released = store.released();
        drop(store);
        if tokio::time::timeout(Duration::from_secs(10), released)
            .await
            .is_err()
        {
            tracing::warn!("the store is still referenced after shutdown");
        }
        public_result
            .context("the public listener task failed")?
            .context("the public listener failed")?;
        Ok(())
    }
}

/// Binds a listener; the error names the setting to change. Returns the port actually bound.
fn bind(address: std::net::SocketAddr, setting: &str) -> anyhow::Result<(TcpListener, u16)> {
    let listener = TcpListener::bind(address)
        .with_context(|| format!("cannot listen on {address} ({setting})"))?;
    let port = listener.local_addr()?.port();
    Ok((listener, port))
}
