//! Stops reading a request body that we have already refused.
//!
//! actix-http (3.20) drains the rest of a chunked body after the handler answered, so that
//! the connection could be reused, and it puts no bound on that drain: a client that keeps
//! sending chunks after its 413 or 408 keeps a worker reading forever (measured here: 2 GB in
//! one second, on one connection). Those answers already say `Connection: close`, so the
//! drain buys nothing. Shutting the socket's read side makes the next read return end-of-file:
//! the dispatcher sends the answer and closes the connection, and the kernel resets whatever
//! the client still sends.
//!
//! The socket is found through the connection data that [`remember`] stores when actix
//! accepts the connection, plain or TLS.

use std::any::Any;
use std::os::fd::{AsRawFd, RawFd};

use actix_tls::accept::rustls_0_23::TlsStream;
use actix_web::dev::Extensions;
use actix_web::rt::net::TcpStream;
use actix_web::HttpRequest;

/// The connection's socket, kept in actix's connection data.
#[derive(Debug, Clone, Copy)]
struct Socket(RawFd);

/// `HttpServer::on_connect` hook: remembers the socket of each new connection.
pub fn remember(connection: &dyn Any, data: &mut Extensions) {
    let fd = if let Some(tcp) = connection.downcast_ref::<TcpStream>() {
        tcp.as_raw_fd()
    } else if let Some(tls) = connection.downcast_ref::<TlsStream<TcpStream>>() {
        tls.get_ref().0.as_raw_fd()
    } else {
        return;
    };
    data.insert(Socket(fd));
}

/// Shuts the read side of the request's connection: no more of its body is read.
pub fn stop_reading(req: &HttpRequest) {
    if let Some(Socket(fd)) = req.conn_data::<Socket>() {
        // SAFETY: the descriptor belongs to the connection this request arrived on, which
        // actix keeps open at least until the request's answer is written; shutdown(2) only
        // changes the socket's state and touches no memory.
        unsafe {
            libc::shutdown(*fd, libc::SHUT_RD);
        }
    }
}
