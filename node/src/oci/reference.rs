//! Image references: `registry/repo:tag`, `registry/repo@sha256:…`, and OCI image layouts
//! on disk as `oci:PATH`, `oci:PATH:TAG` or `oci:PATH@sha256:…`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use super::OciError;

/// Where an artifact comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    Registry(oci_client::Reference),
    Layout {
        path: PathBuf,
        tag: Option<String>,
        digest: Option<String>,
    },
}

impl ImageRef {
    /// The registry host (`127.0.0.1:5000`), or None for a layout.
    pub fn registry(&self) -> Option<&str> {
        match self {
            ImageRef::Registry(r) => Some(r.resolve_registry()),
            ImageRef::Layout { .. } => None,
        }
    }

    /// This reference pinned to `digest` (for `imageID` in pod status).
    pub fn with_digest(&self, digest: &str) -> String {
        match self {
            ImageRef::Registry(r) => format!("{}/{}@{digest}", r.registry(), r.repository()),
            ImageRef::Layout { path, .. } => format!("oci:{}@{digest}", path.display()),
        }
    }
}

impl FromStr for ImageRef {
    type Err = OciError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: &str| OciError::InvalidReference {
            reference: s.to_string(),
            reason: reason.to_string(),
        };
        if s.trim() != s || s.is_empty() {
            return Err(invalid("empty or surrounded by white space"));
        }
        if let Some(rest) = s.strip_prefix("oci:") {
            let (rest, digest) = match rest.split_once('@') {
                Some((p, d)) => {
                    super::validate_digest(d).map_err(|_| invalid("malformed digest"))?;
                    (p, Some(d.to_string()))
                }
                None => (rest, None),
            };
            // A tag follows the last ':' when that part holds no '/' (paths may hold ':').
            let (path, tag) = match rest.rsplit_once(':') {
                Some((p, t)) if !t.contains('/') && !p.is_empty() => (p, Some(t.to_string())),
                _ => (rest, None),
            };
            if path.is_empty() {
                return Err(invalid(
                    "an OCI layout reference needs a path: oci:PATH[:TAG]",
                ));
            }
            if let Some(tag) = &tag
                && !valid_tag(tag)
            {
                return Err(invalid("invalid tag"));
            }
            return Ok(ImageRef::Layout {
                path: PathBuf::from(path),
                tag,
                digest,
            });
        }
        let reference = oci_client::Reference::from_str(s).map_err(|e| invalid(&e.to_string()))?;
        if !valid_repository(reference.repository()) {
            return Err(invalid(
                "repository names are lowercase letters and digits, separated by '.', '_', '__', '-' or '/'",
            ));
        }
        Ok(ImageRef::Registry(reference))
    }
}

/// The distribution spec's repository grammar: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*` per
/// path component.
fn valid_repository(repository: &str) -> bool {
    repository.split('/').all(|component| {
        let bytes = component.as_bytes();
        let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        !bytes.is_empty()
            && bytes.first().is_some_and(alnum)
            && bytes.last().is_some_and(alnum)
            && bytes
                .iter()
                .all(|b| alnum(b) || matches!(b, b'.' | b'_' | b'-'))
            && !component.contains("..")
            && !component.contains("___")
            && !component.contains("._")
            && !component.contains("_.")
    })
}

fn valid_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageRef::Registry(r) => write!(f, "{}", r.whole()),
            ImageRef::Layout { path, tag, digest } => {
                write!(f, "oci:{}", path.display())?;
                if let Some(tag) = tag {
                    write!(f, ":{tag}")?;
                }
                if let Some(digest) = digest {
                    write!(f, "@{digest}")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_registry_and_layout_references() {
        let r: ImageRef = "127.0.0.1:5000/demo/hello:v1".parse().expect("valid");
        assert_eq!(r.registry(), Some("127.0.0.1:5000"));
        let l: ImageRef = "oci:/var/lib/x:y/layout:v2".parse().expect("valid");
        assert_eq!(
            l,
            ImageRef::Layout {
                path: "/var/lib/x:y/layout".into(),
                tag: Some("v2".into()),
                digest: None
            }
        );
        let d = format!("oci:/l@sha256:{}", "b".repeat(64));
        assert!(matches!(
            d.parse::<ImageRef>(),
            Ok(ImageRef::Layout {
                digest: Some(_),
                ..
            })
        ));
    }

    #[test]
    fn refuses_garbage() {
        for bad in [
            "",
            " x",
            "oci:",
            "oci:/p@sha256:xyz",
            "oci:/p:bad tag",
            "UPPER/Case:v1",
            "a//b",
            ":::",
        ] {
            assert!(bad.parse::<ImageRef>().is_err(), "{bad:?}");
        }
    }
}
