//! The brokers the relay may publish to, and how it opens a connection to one of them.
//!
//! `amqp_url` holds one URL per node (lapin takes one host per URI). The relay uses the first
//! that answers and stays on it while it works; when its connection fails it moves to the next
//! ([`super::Relay::run`]). Nodes are named by their position in the list (from 1) in logs,
//! `/readyz` and metrics: the URL carries the password.
//!
//! The TCP connection and the TLS handshake are ours, not lapin's, so that the handshake uses
//! the CA bundle, client certificate and server name from the settings and the ring provider.

use std::sync::Arc;

use lapin::tcp::{AsyncTcpStream, RustlsConnector};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties};

use crate::config::{redact_url, Secret};

/// One broker node: its URL as configured (a secret) and parsed.
#[derive(Clone)]
pub struct Node {
    url: Secret,
    uri: AMQPUri,
}

impl Node {
    /// Why `url` is not an AMQP URL, for the setting's error.
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri = url.parse::<AMQPUri>()?;
        Ok(Self {
            url: Secret::new(url),
            uri,
        })
    }

    pub fn is_tls(&self) -> bool {
        self.uri.scheme == AMQPScheme::AMQPS
    }

    /// The URL with its password replaced, for logs and errors.
    pub fn redacted(&self) -> String {
        redact_url(self.url.expose())
    }

    /// The URL itself, password included (the CLI's own connections need it).
    pub fn expose(&self) -> &str {
        self.url.expose()
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// The broker list and the TLS to use with its `amqps://` nodes.
#[derive(Clone, Debug)]
pub struct Brokers {
    nodes: Vec<Node>,
    /// Built when any node is `amqps://`.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The name the broker's certificate must carry; each URL's host when unset.
    server_name: Option<String>,
}

impl Brokers {
    pub fn new(
        nodes: Vec<Node>,
        tls: Option<rustls::ClientConfig>,
        server_name: Option<String>,
    ) -> Self {
        assert!(!nodes.is_empty(), "at least one broker URL");
        Self {
            nodes,
            tls: tls.map(Arc::new),
            server_name,
        }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Every node's URL, passwords replaced, comma-separated (the start-up summary).
    pub fn redacted(&self) -> String {
        let shown: Vec<String> = self.nodes.iter().map(Node::redacted).collect();
        shown.join(",")
    }

    pub fn node(&self, index: usize) -> &Node {
        &self.nodes[index % self.nodes.len()]
    }

    /// Opens an AMQP connection to node `index` (from 0), over TLS for `amqps://`.
    pub async fn connect(
        &self,
        index: usize,
        properties: ConnectionProperties,
    ) -> lapin::Result<Connection> {
        let node = self.node(index);
        let tls = match (node.is_tls(), &self.tls) {
            (true, Some(config)) => Some(RustlsConnector::from(config.clone())),
            (true, None) => unreachable!("the options build TLS when a URL is amqps://"),
            (false, _) => None,
        };
        let server_name = self
            .server_name
            .clone()
            .unwrap_or_else(|| node.uri.authority.host.clone());
        let runtime = lapin::runtime::default_runtime()?;
        Connection::connector(
            node.uri.clone(),
            runtime,
            async move |uri: AMQPUri, runtime| {
                let host = (uri.authority.host.as_str(), uri.authority.port);
                let addresses: Vec<_> = tokio::net::lookup_host(host).await?.collect();
                let stream = AsyncTcpStream::connect(&runtime, addresses).await?;
                match &tls {
                    Some(tls) => Ok(stream.into_rustls(tls, &server_name).await?),
                    None => Ok(stream),
                }
            },
            properties,
        )
        .await
    }
}
