//! The receiver a customer would write instead: Node.js, express and amqplib
//! (`benches/node-receiver/receiver.js`), answering 202 once RabbitMQ confirms the publish.
//! It runs on the same cores under the same wrk load of new events as the relay's ingest.

use super::*;

const RECEIVER_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/node-receiver");

/// The Node receiver as a child process, killed when dropped.
pub(crate) struct NodeReceiver {
    child: Child,
    pub(crate) port: u16,
}

impl NodeReceiver {
    pub(crate) async fn start(exchange: &str) -> Result<Self> {
        let dir = Path::new(RECEIVER_DIR);
        if !dir.join("node_modules/express").is_dir() || !dir.join("node_modules/amqplib").is_dir()
        {
            bail!(
                "the Node receiver's packages are missing: run `npm ci --prefix {}` (scripts/bench.sh does)",
                dir.display()
            );
        }
        let port = free_port();
        let mut child = Command::new("node")
            .arg("receiver.js")
            .current_dir(dir)
            .env("PORT", port.to_string())
            .env("AMQP_URL", BROKER.replace("%2f", "%2F"))
            .env("EXCHANGE", exchange)
            .env("SECRET", SECRET)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting node (apt-get install nodejs, or the machine's Node.js)")?;
        let stdout = child.stdout.take().context("node's stdout")?;
        let ready = tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .any(|line| line == "listening")
        });
        match tokio::time::timeout(Duration::from_secs(30), ready).await {
            Ok(Ok(true)) => Ok(Self { child, port }),
            _ => {
                let _ = child.kill();
                bail!("the Node receiver did not start listening")
            }
        }
    }
}

impl Drop for NodeReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Node receiver under the ingest load, publishing to an exchange with a bound durable
/// queue of its own (both deleted afterwards).
pub(crate) async fn node_receiver(work: &Path) -> Result<WrkResult> {
    let exchange = format!("bench.node.{}", fastrand::u32(..));
    let queue = format!("{exchange}.q");
    let connection = broker().await?;
    let channel = connection.create_channel().await?;
    declare_bound(&channel, &exchange, &queue).await?;
    let receiver = NodeReceiver::start(&exchange).await?;
    let result = wrk_new(work, receiver.port, "node", seconds(8));
    drop(receiver);
    cleanup(&queue, &exchange).await;
    result
}
