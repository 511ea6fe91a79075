//! A RabbitMQ node of a test's own (Debian's rabbitmq-server: its own node name, ports, data
//! and log directories), for faults that would disturb the other tests on the shared broker:
//! alarms, restarts. Starting one takes about 8 seconds; it is stopped and removed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::helpers::{free_port, wait_until};

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";

pub struct OwnBroker {
    pub node: String,
    pub port: u16,
    process: Child,
    dir: tempfile::TempDir,
}

impl OwnBroker {
    pub async fn start() -> Self {
        Self::start_with("").await
    }

    /// A node with these lines added to its `rabbitmq.conf`.
    pub async fn start_with(config: &str) -> Self {
        assert!(
            std::path::Path::new(SERVER).exists(),
            "{SERVER} is missing: these tests run RabbitMQ nodes of their own from Debian's \
             rabbitmq-server package (scripts/test.sh installs it)"
        );
        let dir = tempfile::tempdir().unwrap();
        let (port, dist_port) = (free_port(), free_port());
        let node = format!("kr-test-{port}@localhost");
        let path = |name: &str| -> PathBuf { dir.path().join(name) };
        std::fs::create_dir_all(path("mnesia")).unwrap();
        std::fs::create_dir_all(path("log")).unwrap();
        std::fs::write(
            path("rabbitmq.conf"),
            format!("listeners.tcp.default = {port}\n{config}"),
        )
        .unwrap();
        // No plugins: the management plugin would want ports of its own.
        std::fs::write(path("enabled_plugins"), "[].\n").unwrap();
        let process = Command::new(SERVER)
            .env("RABBITMQ_NODENAME", &node)
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", path("mnesia"))
            .env("RABBITMQ_LOG_BASE", path("log"))
            .env("RABBITMQ_CONFIG_FILE", path("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", path("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", path("pid"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(path("server.log")).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {SERVER}: {e}"));
        let broker = Self {
            node,
            port,
            process,
            dir,
        };
        let log = broker.dir.path().join("server.log");
        wait_until(
            Duration::from_secs(60),
            "our RabbitMQ node to listen",
            || async {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await;
        assert!(
            broker.ctl(&["await_startup"]).is_ok(),
            "our RabbitMQ node did not start: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        broker
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// `rabbitmqctl -n <node> ARGS`, its output or why it failed.
    pub fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let output = Command::new(CTL)
            .arg("-n")
            .arg(&self.node)
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        if output.status.success() {
            Ok(text)
        } else {
            Err(format!("{text}{}", String::from_utf8_lossy(&output.stderr)))
        }
    }

    /// Sets off the memory alarm (every publishing connection is blocked), or clears it.
    pub fn memory_alarm(&self, on: bool) {
        let watermark = if on { "0.000001" } else { "0.4" };
        self.ctl(&["set_vm_memory_high_watermark", watermark])
            .expect("rabbitmqctl set_vm_memory_high_watermark");
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let _ = self.ctl(&["stop"]);
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}
