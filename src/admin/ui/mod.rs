//! The event inspector at `/ui/`: three files compiled into the binary (`index.html`,
//! `app.js`, `app.css`), no build step, nothing fetched from anywhere at run time.
//!
//! The files hold no data: everything the page shows comes from the admin API, with the token
//! the operator typed, kept in the tab's `sessionStorage` and sent as `Authorization: Bearer`.
//! No cookie is ever set, so another site cannot make the browser send anything on the
//! operator's behalf. Without a configured token the page answers 404, like the API.
//!
//! Bodies hold text typed by callers: the page puts every value in as text, and the headers
//! below forbid what a mistake there could use (inline script, framing, sniffing).

use actix_web::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, LOCATION, REFERRER_POLICY,
    X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use actix_web::{web, HttpRequest, HttpResponse};

use super::api::AdminError;
use super::Admin;
use crate::http::{respond, RequestId};

const INDEX: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("app.js");
const STYLE: &str = include_str!("app.css");

/// Scripts and styles from these files only; no inline script, no eval, no framing, requests
/// only to this listener.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                       img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
                       form-action 'none'; frame-ancestors 'none'";

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/ui", web::get().to(redirect))
        .route("/ui/", web::get().to(index))
        .route("/ui/app.js", web::get().to(script))
        .route("/ui/app.css", web::get().to(style))
        .route("/ui/{rest:.*}", web::get().to(not_found));
}

fn asset(req: &HttpRequest, admin: &Admin, content_type: &str, body: &'static str) -> HttpResponse {
    if admin.options.token.is_none() {
        return respond(&AdminError::NotFound, &RequestId::of(req));
    }
    HttpResponse::Ok()
        .insert_header((CONTENT_TYPE, content_type))
        .insert_header((CONTENT_SECURITY_POLICY, CSP))
        .insert_header((X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((X_FRAME_OPTIONS, "DENY"))
        .insert_header((REFERRER_POLICY, "no-referrer"))
        .insert_header((CACHE_CONTROL, "no-store"))
        .body(body)
}

async fn redirect(req: HttpRequest, admin: web::Data<Admin>) -> HttpResponse {
    if admin.options.token.is_none() {
        return respond(&AdminError::NotFound, &RequestId::of(&req));
    }
    HttpResponse::PermanentRedirect()
        .insert_header((LOCATION, "/ui/"))
        .finish()
}

async fn index(req: HttpRequest, admin: web::Data<Admin>) -> HttpResponse {
    asset(&req, &admin, "text/html; charset=utf-8", INDEX)
}

async fn script(req: HttpRequest, admin: web::Data<Admin>) -> HttpResponse {
    asset(&req, &admin, "text/javascript; charset=utf-8", SCRIPT)
}

async fn style(req: HttpRequest, admin: web::Data<Admin>) -> HttpResponse {
    asset(&req, &admin, "text/css; charset=utf-8", STYLE)
}

async fn not_found(req: HttpRequest) -> HttpResponse {
    respond(&AdminError::NotFound, &RequestId::of(&req))
}
