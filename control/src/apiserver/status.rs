//! Errors as the Kubernetes API reports them: a `Status` object (`kind: Status`,
//! `status: Failure`, `reason`, `code`, `details`) with the HTTP code it names, and the
//! message texts kube-apiserver uses, since clients and people match on them.

use serde_json::{Value, json};

use super::kinds::Kind;

/// One failing field, as `details.causes[]` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    /// `FieldValueInvalid`, `FieldValueRequired`, `FieldValueNotSupported`, ...
    pub reason: &'static str,
    pub field: String,
    pub message: String,
}

/// A request the API refused or could not serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: u16,
    /// The `reason` word (`NotFound`, `AlreadyExists`, `Conflict`, `Invalid`, ...).
    pub reason: &'static str,
    pub message: String,
    /// `details` (boxed: errors travel by value through every handler).
    pub details: Box<Details>,
}

/// `details`: the object named, its group and kind, and failing fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Details {
    pub name: Option<String>,
    pub group: Option<String>,
    pub kind: Option<String>,
    pub causes: Vec<Cause>,
    /// `details.retryAfterSeconds`.
    pub retry_after: Option<u32>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: Box::default(),
        }
    }

    fn about(mut self, kind: &Kind, name: &str) -> Self {
        self.details.name = Some(name.to_owned());
        self.details.group = Some(kind.group.to_owned());
        self.details.kind = Some(kind.resource.to_owned());
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized")
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, "Forbidden", message)
    }

    /// `pods "web" not found`.
    pub fn not_found(kind: &Kind, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} {name:?} not found", kind.qualified()),
        )
        .about(kind, name)
    }

    /// A path that names nothing served.
    pub fn no_route() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }

    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(405, "MethodNotAllowed", message)
    }

    /// `pods "web" already exists`.
    pub fn already_exists(kind: &Kind, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} {name:?} already exists", kind.qualified()),
        )
        .about(kind, name)
    }

    /// The object changed since the client read it.
    pub fn conflict(kind: &Kind, name: &str, why: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} {name:?}: {why}",
                kind.qualified()
            ),
        )
        .about(kind, name)
    }

    /// The standard "modified" conflict.
    pub fn modified(kind: &Kind, name: &str) -> Self {
        Self::conflict(
            kind,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    /// `Pod "web" is invalid: spec.containers[0].image: Required value`.
    pub fn invalid(kind: &Kind, name: &str, causes: Vec<Cause>) -> Self {
        let list = causes
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect::<Vec<_>>();
        let joined = if list.len() == 1 {
            list[0].clone()
        } else {
            format!("[{}]", list.join(", "))
        };
        let mut e = Self::new(
            422,
            "Invalid",
            format!("{} {name:?} is invalid: {joined}", kind.kind),
        )
        .about(kind, name);
        e.details.kind = Some(kind.kind.to_owned());
        e.details.causes = causes;
        e
    }

    /// One invalid field.
    pub fn invalid_field(kind: &Kind, name: &str, field: &str, message: &str) -> Self {
        Self::invalid(
            kind,
            name,
            vec![Cause {
                reason: "FieldValueInvalid",
                field: field.to_owned(),
                message: message.to_owned(),
            }],
        )
    }

    /// The watch or continue token points at history that is gone.
    pub fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(413, "RequestEntityTooLarge", message)
    }

    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml, application/vnd.kubernetes.protobuf (for the kinds kubectl's create commands send); got {content_type:?}"
            ),
        )
    }

    pub fn too_many_requests(message: impl Into<String>) -> Self {
        let mut e = Self::new(429, "TooManyRequests", message);
        e.details.retry_after = Some(1);
        e
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message)
    }

    /// What Brink does not do: said plainly, never a silent difference.
    /// A server-side apply that would change fields other managers own.
    pub fn apply_conflict(kind: &Kind, name: &str, conflicts: &super::managed::Conflicts) -> Self {
        let mut e = Self::new(409, "Conflict", conflicts.message()).about(kind, name);
        e.details.causes = conflicts
            .0
            .iter()
            .map(|(manager, path)| Cause {
                reason: "FieldManagerConflict",
                field: super::managed::Printed(path).to_string(),
                message: format!("conflict with {manager}"),
            })
            .collect();
        e
    }

    pub fn not_implemented(message: impl Into<String>) -> Self {
        Self::new(501, "NotImplemented", message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        let mut e = Self::new(503, "ServiceUnavailable", message);
        e.details.retry_after = Some(1);
        e
    }

    pub fn timeout(message: impl Into<String>) -> Self {
        let mut e = Self::new(504, "Timeout", message);
        e.details.retry_after = Some(1);
        e
    }

    /// The `Status` object.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        let mut details = serde_json::Map::new();
        let d = &self.details;
        if let Some(name) = &d.name {
            details.insert("name".into(), json!(name));
        }
        if let Some(group) = &d.group
            && !group.is_empty()
        {
            details.insert("group".into(), json!(group));
        }
        if let Some(kind) = &d.kind {
            details.insert("kind".into(), json!(kind));
        }
        if !d.causes.is_empty() {
            details.insert(
                "causes".into(),
                d.causes
                    .iter()
                    .map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field}))
                    .collect(),
            );
        }
        if let Some(seconds) = d.retry_after {
            details.insert("retryAfterSeconds".into(), json!(seconds));
        }
        if !details.is_empty() {
            status["details"] = Value::Object(details);
        }
        status
    }
}

/// A successful deletion or other action answered with a `Status`.
pub fn success(kind: &Kind, name: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {"name": name, "group": kind.group, "kind": kind.resource},
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::kinds::find;

    #[test]
    fn statuses_read_as_kube_apiserver_writes_them() {
        let pods = find("", "v1", "pods").expect("pods");
        let status = ApiError::not_found(pods, "web").to_status();
        assert_eq!(status["message"], "pods \"web\" not found");
        assert_eq!(status["reason"], "NotFound");
        assert_eq!(status["code"], 404);
        assert_eq!(status["details"]["kind"], "pods");
        let invalid = ApiError::invalid_field(pods, "web", "metadata.name", "bad").to_status();
        assert_eq!(invalid["code"], 422);
        assert_eq!(invalid["details"]["causes"][0]["field"], "metadata.name");
        assert_eq!(
            invalid["message"],
            "Pod \"web\" is invalid: metadata.name: bad"
        );
    }
}
