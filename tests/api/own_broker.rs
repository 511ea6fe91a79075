//! A RabbitMQ node of a test's own (Debian's rabbitmq-server: its own node name, ports, data
//! and log directories), for faults that would disturb the other tests on the shared broker:
//! alarms, restarts. Starting one takes about 8 seconds; it is stopped and removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::helpers::{free_port, random_name, wait_until};

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";
const QUEUES: &str = "/usr/lib/rabbitmq/bin/rabbitmq-queues";

pub struct OwnBroker {
    pub node: String,
    pub port: u16,
    dist_port: u16,
    process: Child,
    dir: tempfile::TempDir,
    /// `HOME` of the node and of `rabbitmqctl`, holding the Erlang cookie a cluster shares;
    /// the user's own when `None`.
    home: Option<PathBuf>,
}

impl OwnBroker {
    pub async fn start() -> Self {
        Self::start_with("").await
    }

    /// A node with these lines added to its `rabbitmq.conf`.
    pub async fn start_with(config: &str) -> Self {
        let broker = Self::spawn_new(config, None);
        broker.await_startup().await;
        broker
    }

    /// Writes the node's files and starts it; [`Self::await_startup`] waits for it.
    fn spawn_new(config: &str, home: Option<PathBuf>) -> Self {
        assert!(
            std::path::Path::new(SERVER).exists(),
            "{SERVER} is missing: these tests run RabbitMQ nodes of their own from Debian's \
             rabbitmq-server package (scripts/test.sh installs it)"
        );
        let dir = tempfile::tempdir().unwrap();
        let (port, dist_port) = (free_port(), free_port());
        let node = format!("kr-test-{port}@localhost");
        std::fs::create_dir_all(dir.path().join("mnesia")).unwrap();
        std::fs::create_dir_all(dir.path().join("log")).unwrap();
        std::fs::write(
            dir.path().join("rabbitmq.conf"),
            format!("listeners.tcp.default = {port}\n{config}"),
        )
        .unwrap();
        // No plugins: the management plugin would want ports of its own.
        std::fs::write(dir.path().join("enabled_plugins"), "[].\n").unwrap();
        let process = spawn(&node, port, dist_port, dir.path(), home.as_deref());
        Self {
            node,
            port,
            dist_port,
            process,
            dir,
            home,
        }
    }

    async fn await_startup(&self) {
        let port = self.port;
        wait_until(
            Duration::from_secs(90),
            "our RabbitMQ node to listen",
            || async {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await;
        let log = self.dir.path().join("server.log");
        assert!(
            self.ctl(&["await_startup"]).is_ok(),
            "our RabbitMQ node did not start: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// `rabbitmqctl -n <node> ARGS`, its output or why it failed.
    pub fn ctl(&self, args: &[&str]) -> Result<String, String> {
        self.tool(CTL, args)
    }

    /// One of RabbitMQ's command-line tools (`rabbitmqctl`, `rabbitmq-queues`) on this node.
    pub fn tool(&self, tool: &str, args: &[&str]) -> Result<String, String> {
        let mut command = Command::new(tool);
        if let Some(home) = &self.home {
            command.env("HOME", home);
        }
        let output = command
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

    /// `kill -9` of the Erlang VM: the node dies as in a crash, with no goodbye to its peers
    /// or clients. Its data directory stays for [`Self::restart`].
    pub fn kill(&mut self) {
        let pid_file = self.dir.path().join("pid");
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .unwrap_or_else(|e| panic!("{}: {e}", pid_file.display()))
            .trim()
            .parse()
            .expect("a pid in the node's pid file");
        // SAFETY: a plain kill(2) of a process of our own.
        assert_eq!(
            unsafe { libc::kill(pid, libc::SIGKILL) },
            0,
            "kill -9 {pid}"
        );
        let _ = self.process.wait();
    }

    /// Starts a killed node again on its data, ports and name, and waits until it runs.
    pub async fn restart(&mut self) {
        self.process = spawn(
            &self.node,
            self.port,
            self.dist_port,
            self.dir.path(),
            self.home.as_deref(),
        );
        self.await_startup().await;
    }
}

fn spawn(node: &str, port: u16, dist_port: u16, dir: &Path, home: Option<&Path>) -> Child {
    let path = |name: &str| -> PathBuf { dir.join(name) };
    let mut command = Command::new(SERVER);
    if let Some(home) = home {
        command.env("HOME", home);
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path("server.log"))
        .unwrap();
    command
        .env("RABBITMQ_NODENAME", node)
        .env("RABBITMQ_NODE_PORT", port.to_string())
        .env("RABBITMQ_DIST_PORT", dist_port.to_string())
        .env("RABBITMQ_MNESIA_BASE", path("mnesia"))
        .env("RABBITMQ_LOG_BASE", path("log"))
        .env("RABBITMQ_CONFIG_FILE", path("rabbitmq.conf"))
        .env("RABBITMQ_ENABLED_PLUGINS_FILE", path("enabled_plugins"))
        .env("RABBITMQ_PID_FILE", path("pid"))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {SERVER}: {e}"))
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        if matches!(self.process.try_wait(), Ok(None)) {
            let _ = self.ctl(&["stop"]);
        }
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// A RabbitMQ cluster of the test's own: nodes started together, sharing an Erlang cookie in
/// a `HOME` of the cluster's own, then joined to the first with `join_cluster`.
pub struct OwnCluster {
    pub nodes: Vec<OwnBroker>,
    _home: tempfile::TempDir,
}

impl OwnCluster {
    pub async fn start(size: usize) -> Self {
        let home = tempfile::tempdir().unwrap();
        let cookie = home.path().join(".erlang.cookie");
        std::fs::write(&cookie, random_name("cookie").replace('.', "")).unwrap();
        std::fs::set_permissions(&cookie, std::os::unix::fs::PermissionsExt::from_mode(0o400))
            .unwrap();
        let nodes: Vec<OwnBroker> = (0..size)
            .map(|_| OwnBroker::spawn_new("", Some(home.path().to_path_buf())))
            .collect();
        for node in &nodes {
            node.await_startup().await;
        }
        let first = nodes[0].node.clone();
        for node in &nodes[1..] {
            for step in [
                vec!["stop_app"],
                vec!["join_cluster", &first],
                vec!["start_app"],
            ] {
                node.ctl(&step)
                    .unwrap_or_else(|e| panic!("rabbitmqctl {step:?} on {}: {e}", node.node));
            }
        }
        // Joined is not yet running: a quorum queue declared now would get members only on
        // the nodes running at that moment, and could not survive its first node.
        let first = &nodes[0];
        let names: Vec<String> = nodes.iter().map(|n| n.node.clone()).collect();
        wait_until(
            Duration::from_secs(60),
            "every node of the cluster to run",
            || async {
                let running: Vec<String> = first
                    .ctl(&["cluster_status", "--formatter", "json"])
                    .ok()
                    .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
                    .and_then(|v| serde_json::from_value(v["running_nodes"].clone()).ok())
                    .unwrap_or_default();
                names.iter().all(|n| running.contains(n))
            },
        )
        .await;
        Self { nodes, _home: home }
    }

    /// Every node's URL, comma-separated, in order: the relay's `amqp_url`.
    pub fn urls(&self) -> String {
        let urls: Vec<String> = self.nodes.iter().map(OwnBroker::url).collect();
        urls.join(",")
    }

    /// Waits until stopping `node` would leave every quorum queue a majority (a restarted
    /// member has caught up).
    pub async fn wait_not_quorum_critical(&self, node: usize) {
        let broker = &self.nodes[node];
        wait_until(
            Duration::from_secs(60),
            "the node to be no longer quorum critical",
            || async {
                broker
                    .tool(QUEUES, &["check_if_node_is_quorum_critical"])
                    .is_ok()
            },
        )
        .await;
    }
}
