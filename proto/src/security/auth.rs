//! The server side of bearer tokens: every request's `authorization` header is checked against
//! the server's [`TokenTable`] before the request reaches a service (and before its body is
//! read). Refusals are gRPC statuses: `UNAUTHENTICATED` for a missing or unknown token,
//! `PERMISSION_DENIED` for a token whose role does not allow the method.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

use super::tokens::{Need, TokenTable, need_for};

/// The token of an `authorization: Bearer TOKEN` header value.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    let value = header?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Whether a request for `path` carrying `header` may be served, else the status to refuse it
/// with.
pub fn check(table: &TokenTable, path: &str, header: Option<&str>) -> Result<(), tonic::Status> {
    let need = need_for(path);
    if need == Need::Open {
        return Ok(());
    }
    let Some(token) = bearer(header) else {
        return Err(tonic::Status::unauthenticated(format!(
            "{path}: no bearer token (set RLHF_TOKEN or RLHF_TOKEN_FILE; docs/security.md)"
        )));
    };
    match table.role_of(token) {
        None => Err(tonic::Status::unauthenticated(format!(
            "{path}: the bearer token is not one this server accepts"
        ))),
        Some(role) if role.allows(need) => Ok(()),
        Some(role) => Err(tonic::Status::permission_denied(format!(
            "{path}: a {role} token may not call this method"
        ))),
    }
}

/// The middleware: refuses what [`check`] refuses, passes the rest on.
pub async fn middleware(
    State(table): State<Arc<TokenTable>>,
    request: Request,
    next: Next,
) -> Response {
    let header = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match check(&table, request.uri().path(), header) {
        Ok(()) => next.run(request).await,
        Err(status) => {
            tracing::debug!(path = request.uri().path(), "refused: {}", status.message());
            status.into_http::<axum::body::Body>()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::Role;

    #[test]
    fn requests_are_refused_with_the_status_their_token_earns() {
        let mut text = String::new();
        for (role, token) in [("read", "r".repeat(20)), ("submit", "s".repeat(20))] {
            text += &format!("{role} {token}\n");
        }
        let table = TokenTable::parse(&text, "t").unwrap();
        let read = format!("Bearer {}", "r".repeat(20));
        let submit = format!("bearer {}", "s".repeat(20));
        let submit_path = "/rlhf.v1.JobService/Submit";
        assert!(check(&table, "/grpc.health.v1.Health/Check", None).is_ok());
        let code = |h: Option<&str>, p: &str| check(&table, p, h).err().map(|s| s.code());
        assert_eq!(code(None, submit_path), Some(tonic::Code::Unauthenticated));
        assert_eq!(
            code(Some("Bearer nope-nope-nope-nope"), submit_path),
            Some(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            code(Some(&read.replace("Bearer", "Basic")), submit_path),
            Some(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            code(Some(&read), submit_path),
            Some(tonic::Code::PermissionDenied)
        );
        assert_eq!(code(Some(&read), "/rlhf.v1.JobService/List"), None);
        assert_eq!(code(Some(&submit), submit_path), None);
        assert_eq!(
            code(Some(&submit), "/rlhf.v1.WorkerService/Register"),
            Some(tonic::Code::PermissionDenied)
        );
        let join = TokenTable::single(&"j".repeat(20), Role::Join);
        let j = format!("Bearer {}", "j".repeat(20));
        assert!(check(&join, "/rlhf.v1.LearnerService/Step", Some(&j)).is_ok());
    }
}
