//! Bearer tokens: the roles a token grants, which role each gRPC method needs, and the token
//! table a server accepts (docs/security.md).

use std::fmt;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a token lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Read jobs, logs and workers.
    Read,
    /// Read, submit and cancel jobs.
    Submit,
    /// The cluster's own credential: workers joining the pool, services calling each other.
    Join,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "read" => Some(Role::Read),
            "submit" => Some(Role::Submit),
            "join" => Some(Role::Join),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Submit => "submit",
            Role::Join => "join",
        }
    }

    /// Whether this role may call a method that needs `need`.
    pub fn allows(self, need: Need) -> bool {
        match need {
            Need::Open | Need::Read => true,
            Need::Submit => self == Role::Submit,
            Need::Join => self == Role::Join,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a request needs to be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Nothing: health checks and `/metrics`.
    Open,
    Read,
    Submit,
    Join,
}

/// The role a request path (`/package.Service/Method`, or `/metrics`) needs. Anything not named
/// here needs the cluster's `join` token: a new service is closed until it is opened on purpose.
pub fn need_for(path: &str) -> Need {
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path.trim_start_matches('/'), ""));
    match service {
        "metrics" if method.is_empty() => Need::Open,
        "grpc.health.v1.Health" => Need::Open,
        s if s.starts_with("grpc.reflection.") => Need::Read,
        "rlhf.v1.JobService" => match method {
            "Get" | "List" | "Watch" | "Logs" => Need::Read,
            _ => Need::Submit,
        },
        "rlhf.v1.WorkerService" => match method {
            "ListWorkers" => Need::Read,
            _ => Need::Join,
        },
        _ => Need::Join,
    }
}

/// The tokens a server accepts, each with its role. Tokens are kept as SHA-256 digests and
/// compared in constant time.
#[derive(Clone, Default)]
pub struct TokenTable {
    entries: Vec<([u8; 32], Role)>,
    /// The cluster's `join` token itself: what a coordinator presents to the services it drives.
    join: Option<String>,
}

impl fmt::Debug for TokenTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let roles: Vec<_> = self.entries.iter().map(|(_, r)| r.as_str()).collect();
        f.debug_struct("TokenTable").field("roles", &roles).finish()
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A token is 16 to 4096 visible ASCII characters (it travels in an HTTP header).
pub fn token_problem(token: &str) -> Option<String> {
    if token.len() < 16 {
        Some(format!(
            "is {} characters long; a token has at least 16",
            token.len()
        ))
    } else if token.len() > 4096 {
        Some("is longer than 4096 characters".into())
    } else if !token.bytes().all(|b| b.is_ascii_graphic()) {
        Some("has a character that is not visible ASCII".into())
    } else {
        None
    }
}

impl TokenTable {
    /// A table of one token with `role` (a service accepts the cluster's `join` token).
    pub fn single(token: &str, role: Role) -> TokenTable {
        TokenTable {
            entries: vec![(digest(token), role)],
            join: (role == Role::Join).then(|| token.to_string()),
        }
    }

    /// Parses a token file: `ROLE TOKEN` per line, `#` comments, blank lines ignored. Errors
    /// name `file` and the line.
    pub fn parse(text: &str, file: &str) -> Result<TokenTable, String> {
        let mut table = TokenTable::default();
        for (n, line) in text.lines().enumerate() {
            let at = |m: String| format!("{file}:{}: {m}", n + 1);
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut words = line.split_whitespace();
            let (Some(role), Some(token), None) = (words.next(), words.next(), words.next()) else {
                return Err(at("expected `ROLE TOKEN` (two words)".into()));
            };
            let role = Role::parse(role).ok_or_else(|| {
                // A short word is a mistyped role; a long one may be a token written first,
                // which must not end up on a terminal or in a log.
                let shown = if role.len() < 16 { role } else { "…" };
                at(format!(
                    "unknown role `{shown}` (one of: read, submit, join; `ROLE TOKEN` per line)"
                ))
            })?;
            if let Some(p) = token_problem(token) {
                return Err(at(format!("the token {p}")));
            }
            if table.role_of(token).is_some() {
                return Err(at("this token is already listed".into()));
            }
            if role == Role::Join {
                if table.join.is_some() {
                    return Err(at(
                        "a second join token: a cluster has one (workers and services share it)"
                            .into(),
                    ));
                }
                table.join = Some(token.to_string());
            }
            table.entries.push((digest(token), role));
        }
        if table.entries.is_empty() {
            return Err(format!("{file}: no tokens"));
        }
        Ok(table)
    }

    /// The role of `token`, if the table holds it.
    pub fn role_of(&self, token: &str) -> Option<Role> {
        let d = digest(token);
        // Every entry is compared, so the time taken does not say which one matched.
        self.entries.iter().fold(None, |found, (entry, role)| {
            if bool::from(entry.ct_eq(&d)) {
                Some(*role)
            } else {
                found
            }
        })
    }

    /// The cluster's `join` token, if the table has one.
    pub fn join_token(&self) -> Option<&str> {
        self.join.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbb";
    const C: &str = "cccccccccccccccccccccccc";

    #[test]
    fn methods_need_the_role_the_docs_give_them() {
        assert_eq!(need_for("/grpc.health.v1.Health/Check"), Need::Open);
        assert_eq!(need_for("/metrics"), Need::Open);
        assert_eq!(need_for("/rlhf.v1.JobService/List"), Need::Read);
        assert_eq!(need_for("/rlhf.v1.JobService/Logs"), Need::Read);
        assert_eq!(need_for("/rlhf.v1.JobService/Submit"), Need::Submit);
        assert_eq!(need_for("/rlhf.v1.JobService/Cancel"), Need::Submit);
        assert_eq!(need_for("/rlhf.v1.JobService/NewMethod"), Need::Submit);
        assert_eq!(need_for("/rlhf.v1.WorkerService/ListWorkers"), Need::Read);
        assert_eq!(need_for("/rlhf.v1.WorkerService/Register"), Need::Join);
        assert_eq!(
            need_for("/rlhf.v1.RolloutService/UpdateWeights"),
            Need::Join
        );
        assert_eq!(need_for("/rlhf.v1.LearnerService/Step"), Need::Join);
        assert_eq!(
            need_for("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            Need::Read
        );
        assert_eq!(need_for("/metrics/x"), Need::Join);
        assert_eq!(need_for("/"), Need::Join);
    }

    #[test]
    fn roles_allow_only_their_methods() {
        assert!(Role::Read.allows(Need::Read));
        assert!(!Role::Read.allows(Need::Submit));
        assert!(!Role::Read.allows(Need::Join));
        assert!(Role::Submit.allows(Need::Submit));
        assert!(!Role::Submit.allows(Need::Join));
        assert!(Role::Join.allows(Need::Join));
        assert!(!Role::Join.allows(Need::Submit));
    }

    #[test]
    fn a_token_file_parses_with_comments_and_finds_each_role() {
        let text = format!("# tokens\nread {A}\n\n  submit   {B}  # ops\njoin {C}\n");
        let t = TokenTable::parse(&text, "tokens").unwrap();
        assert_eq!(t.role_of(A), Some(Role::Read));
        assert_eq!(t.role_of(B), Some(Role::Submit));
        assert_eq!(t.role_of(C), Some(Role::Join));
        assert_eq!(t.role_of("dddddddddddddddddddd"), None);
        assert_eq!(t.join_token(), Some(C));
        assert!(!format!("{t:?}").contains(A), "Debug shows no token");
    }

    #[test]
    fn a_broken_token_file_is_refused_with_its_line() {
        let cases = [
            (
                format!("read {A}\nwrite {B}\n"),
                "tokens:2: unknown role `write`",
            ),
            (
                format!("read {A} extra\n"),
                "tokens:1: expected `ROLE TOKEN`",
            ),
            (
                "read short\n".to_string(),
                "tokens:1: the token is 5 characters",
            ),
            (
                format!("join {A}\njoin {B}\n"),
                "tokens:2: a second join token",
            ),
            (
                format!("read {A}\nsubmit {A}\n"),
                "tokens:2: this token is already",
            ),
            ("# nothing\n".to_string(), "tokens: no tokens"),
        ];
        let swapped = format!("{A} read\n");
        let err = TokenTable::parse(&swapped, "tokens").unwrap_err();
        assert!(!err.contains(A), "the token was echoed: {err}");
        for (text, want) in cases {
            let err = TokenTable::parse(&text, "tokens").unwrap_err();
            assert!(err.starts_with(want), "{text:?}: {err}");
        }
    }
}
