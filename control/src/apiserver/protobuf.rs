//! Request bodies in Kubernetes' protobuf encoding, decoded into JSON objects.
//!
//! kubectl's typed commands (`create namespace|configmap|secret|deployment|...`) send
//! `application/vnd.kubernetes.protobuf`: the magic `k8s\0`, then a `runtime.Unknown`
//! envelope (type meta, raw object bytes). Brink decodes the wire format itself against
//! a table of the messages those commands send (field numbers are the Kubernetes API's,
//! JSON names its `json` tags). A field the table does not know is refused by message
//! and number, so nothing is silently dropped; answers are always JSON (clients that
//! send protobuf accept JSON back).

use std::collections::HashMap;
use std::sync::OnceLock;

use serde_json::{Map, Value, json};

/// The media type.
pub const MEDIA_TYPE: &str = "application/vnd.kubernetes.protobuf";
const MAGIC: &[u8] = b"k8s\0";
/// Deeper nesting than any Kubernetes object has is refused.
const MAX_DEPTH: usize = 32;

/// A body that does not decode.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("protobuf body: {0}")]
pub struct ProtobufError(pub String);

fn err(message: impl Into<String>) -> ProtobufError {
    ProtobufError(message.into())
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum FieldType {
    Str,
    Int,
    Bool,
    /// Bytes, shown as base64.
    Bytes,
    /// `metav1.Time`: seconds and nanos, shown as RFC 3339.
    Time,
    /// `resource.Quantity`: its string.
    Quantity,
    /// `intstr.IntOrString`.
    IntOrString,
    Message(&'static str),
    MapStr,
    MapBytes,
    MapQuantity,
}

#[derive(Debug, Clone)]
struct Field {
    json: &'static str,
    ty: FieldType,
    repeated: bool,
    /// Zero, false and empty values are kept (the Go field is a pointer, so its
    /// presence means something); otherwise they are dropped, as `omitempty` drops
    /// them in JSON.
    keep_zero: bool,
}

/// The messages, one per line: `Name: tag json type, ...` where type is `s` string,
/// `i` integer, `b` bool, `y` bytes, `t` Time, `q` Quantity, `x` IntOrString, `ss` /
/// `sy` / `sq` maps of strings, bytes, quantities, or another message's name; `*`
/// before the type repeats it, `!` after it keeps zero values.
const SCHEMA: &str = "
TypeMeta: 1 apiVersion s, 2 kind s
Unknown: 1 typeMeta TypeMeta, 2 raw y, 3 contentEncoding s, 4 contentType s
ObjectMeta: 1 name s, 2 generateName s, 3 namespace s, 4 selfLink s, 5 uid s, 6 resourceVersion s, 7 generation i, 8 creationTimestamp t, 9 deletionTimestamp t, 10 deletionGracePeriodSeconds i!, 11 labels ss, 12 annotations ss, 13 ownerReferences *OwnerReference, 14 finalizers *s
OwnerReference: 1 kind s, 3 name s, 4 uid s, 5 apiVersion s, 6 controller b!, 7 blockOwnerDeletion b!
LabelSelector: 1 matchLabels ss, 2 matchExpressions *LabelSelectorRequirement
LabelSelectorRequirement: 1 key s, 2 operator s, 3 values *s
Namespace: 1 metadata ObjectMeta, 2 spec NamespaceSpec, 3 status NamespaceStatus
NamespaceSpec: 1 finalizers *s
NamespaceStatus: 1 phase s
ConfigMap: 1 metadata ObjectMeta, 2 data ss, 3 binaryData sy, 4 immutable b!
Secret: 1 metadata ObjectMeta, 2 data sy, 3 type s, 4 stringData ss, 5 immutable b!
ServiceAccount: 1 metadata ObjectMeta, 2 secrets *ObjectReference, 3 imagePullSecrets *LocalObjectReference, 4 automountServiceAccountToken b!
ObjectReference: 1 kind s, 2 namespace s, 3 name s, 4 uid s, 5 apiVersion s, 6 resourceVersion s, 7 fieldPath s
LocalObjectReference: 1 name s
Service: 1 metadata ObjectMeta, 2 spec ServiceSpec, 3 status ServiceStatus
ServiceSpec: 1 ports *ServicePort, 2 selector ss, 3 clusterIP s, 4 type s, 5 externalIPs *s, 7 sessionAffinity s, 10 externalName s, 18 clusterIPs *s
ServicePort: 1 name s, 2 protocol s, 3 port i, 4 targetPort x, 5 nodePort i, 6 appProtocol s
ServiceStatus:
PodTemplateSpec: 1 metadata ObjectMeta, 2 spec PodSpec
PodSpec: 2 containers *Container, 3 restartPolicy s, 4 terminationGracePeriodSeconds i!, 5 activeDeadlineSeconds i!, 6 dnsPolicy s, 7 nodeSelector ss, 8 serviceAccountName s, 9 serviceAccount s, 10 nodeName s, 11 hostNetwork b, 12 hostPID b, 13 hostIPC b, 15 imagePullSecrets *LocalObjectReference, 16 hostname s, 17 subdomain s, 19 schedulerName s, 24 priorityClassName s, 29 runtimeClassName s
Container: 1 name s, 2 image s, 3 command *s, 4 args *s, 5 workingDir s, 6 ports *ContainerPort, 7 env *EnvVar, 8 resources ResourceRequirements, 13 terminationMessagePath s, 14 imagePullPolicy s, 16 stdin b, 17 stdinOnce b, 18 tty b, 20 terminationMessagePolicy s, 24 restartPolicy s
ContainerPort: 1 name s, 2 hostPort i, 3 containerPort i, 4 protocol s, 5 hostIP s
EnvVar: 1 name s, 2 value s
ResourceRequirements: 1 limits sq, 2 requests sq
Deployment: 1 metadata ObjectMeta, 2 spec DeploymentSpec, 3 status DeploymentStatus
DeploymentSpec: 1 replicas i!, 2 selector LabelSelector, 3 template PodTemplateSpec, 4 strategy DeploymentStrategy, 5 minReadySeconds i, 6 revisionHistoryLimit i!, 7 paused b, 9 progressDeadlineSeconds i!
DeploymentStrategy: 1 type s, 2 rollingUpdate RollingUpdateDeployment
RollingUpdateDeployment: 1 maxUnavailable x, 2 maxSurge x
DeploymentStatus: 1 observedGeneration i, 2 replicas i, 3 updatedReplicas i, 4 availableReplicas i, 5 unavailableReplicas i, 7 readyReplicas i
Job: 1 metadata ObjectMeta, 2 spec JobSpec, 3 status JobStatus
JobSpec: 1 parallelism i!, 2 completions i!, 3 activeDeadlineSeconds i!, 4 selector LabelSelector, 5 manualSelector b!, 6 template PodTemplateSpec, 7 backoffLimit i!, 8 ttlSecondsAfterFinished i!, 9 completionMode s, 10 suspend b!
JobStatus: 4 active i, 5 succeeded i, 6 failed i
Role: 1 metadata ObjectMeta, 2 rules *PolicyRule
ClusterRole: 1 metadata ObjectMeta, 2 rules *PolicyRule, 3 aggregationRule AggregationRule
AggregationRule: 1 clusterRoleSelectors *LabelSelector
PolicyRule: 1 verbs *s, 2 apiGroups *s, 3 resources *s, 4 resourceNames *s, 5 nonResourceURLs *s
RoleBinding: 1 metadata ObjectMeta, 2 subjects *Subject, 3 roleRef RoleRef
ClusterRoleBinding: 1 metadata ObjectMeta, 2 subjects *Subject, 3 roleRef RoleRef
RoleRef: 1 apiGroup s, 2 kind s, 3 name s
Subject: 1 kind s, 2 apiGroup s, 3 name s, 4 namespace s
";

type Schema = HashMap<&'static str, HashMap<u64, Field>>;

fn parse_schema() -> Schema {
    let mut schema = HashMap::new();
    for line in SCHEMA.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let Some((name, fields)) = line.split_once(':') else {
            continue;
        };
        let mut table = HashMap::new();
        for spec in fields.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let mut parts = spec.split_whitespace();
            let (Some(tag), Some(json), Some(ty)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let Ok(tag) = tag.parse::<u64>() else {
                continue;
            };
            let repeated = ty.starts_with('*');
            let keep_zero = ty.ends_with('!');
            let ty = ty.trim_start_matches('*').trim_end_matches('!');
            let ty = match ty {
                "s" => FieldType::Str,
                "i" => FieldType::Int,
                "b" => FieldType::Bool,
                "y" => FieldType::Bytes,
                "t" => FieldType::Time,
                "q" => FieldType::Quantity,
                "x" => FieldType::IntOrString,
                "ss" => FieldType::MapStr,
                "sy" => FieldType::MapBytes,
                "sq" => FieldType::MapQuantity,
                other => FieldType::Message(other),
            };
            table.insert(
                tag,
                Field {
                    json,
                    ty,
                    repeated,
                    keep_zero,
                },
            );
        }
        schema.insert(name, table);
    }
    schema
}

fn schema() -> &'static Schema {
    static SCHEMA_TABLE: OnceLock<Schema> = OnceLock::new();
    SCHEMA_TABLE.get_or_init(parse_schema)
}

/// One field as it appears on the wire.
enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, ProtobufError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self
                .bytes
                .get(self.at)
                .ok_or_else(|| err("truncated varint"))?;
            self.at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(err("varint longer than 10 bytes"))
    }

    fn next(&mut self) -> Result<Option<(u64, Wire<'a>)>, ProtobufError> {
        if self.at >= self.bytes.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let (tag, wire_type) = (key >> 3, key & 7);
        let value = match wire_type {
            0 => Wire::Varint(self.varint()?),
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| err("length overflow"))?;
                let end = self
                    .at
                    .checked_add(len)
                    .filter(|end| *end <= self.bytes.len())
                    .ok_or_else(|| err("a length runs past the end"))?;
                let slice = &self.bytes[self.at..end];
                self.at = end;
                Wire::Bytes(slice)
            }
            other => {
                return Err(err(format!(
                    "wire type {other} is not used by Kubernetes objects"
                )));
            }
        };
        Ok(Some((tag, value)))
    }
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn text(bytes: &[u8]) -> Result<String, ProtobufError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| err("a string is not UTF-8"))
}

fn bytes_of<'a>(wire: &Wire<'a>, what: &str) -> Result<&'a [u8], ProtobufError> {
    match wire {
        Wire::Bytes(b) => Ok(b),
        Wire::Varint(_) => Err(err(format!("{what}: expected length-delimited data"))),
    }
}

/// A map entry: key (1) and value (2).
fn entry<'a>(bytes: &'a [u8]) -> Result<(String, Option<Wire<'a>>), ProtobufError> {
    let mut reader = Reader { bytes, at: 0 };
    let mut key = String::new();
    let mut value = None;
    while let Some((tag, wire)) = reader.next()? {
        match tag {
            1 => key = text(bytes_of(&wire, "map key")?)?,
            2 => value = Some(wire),
            other => return Err(err(format!("map entry field {other}"))),
        }
    }
    Ok((key, value))
}

fn time(bytes: &[u8]) -> Result<Value, ProtobufError> {
    let mut reader = Reader { bytes, at: 0 };
    let mut seconds = 0i64;
    while let Some((tag, wire)) = reader.next()? {
        if let (1, Wire::Varint(v)) = (tag, wire) {
            seconds = v as i64;
        }
    }
    if seconds == 0 {
        return Ok(Value::Null);
    }
    let ts = jiff::Timestamp::from_second(seconds).map_err(|e| err(format!("time: {e}")))?;
    Ok(json!(ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()))
}

fn quantity(bytes: &[u8]) -> Result<Value, ProtobufError> {
    let mut reader = Reader { bytes, at: 0 };
    let mut out = String::new();
    while let Some((tag, wire)) = reader.next()? {
        if tag == 1 {
            out = text(bytes_of(&wire, "quantity")?)?;
        }
    }
    Ok(json!(out))
}

fn int_or_string(bytes: &[u8]) -> Result<Value, ProtobufError> {
    let mut reader = Reader { bytes, at: 0 };
    let (mut kind, mut int, mut string) = (0u64, 0i64, String::new());
    while let Some((tag, wire)) = reader.next()? {
        match (tag, wire) {
            (1, Wire::Varint(v)) => kind = v,
            (2, Wire::Varint(v)) => int = i64::from(v as i32),
            (3, w) => string = text(bytes_of(&w, "intOrString")?)?,
            (other, _) => return Err(err(format!("IntOrString field {other}"))),
        }
    }
    Ok(if kind == 1 { json!(string) } else { json!(int) })
}

fn scalar(field: &Field, wire: &Wire<'_>, depth: usize) -> Result<Value, ProtobufError> {
    Ok(match (&field.ty, wire) {
        (FieldType::Str, w) => json!(text(bytes_of(w, field.json)?)?),
        (FieldType::Int, Wire::Varint(v)) => json!(*v as i64),
        (FieldType::Bool, Wire::Varint(v)) => json!(*v != 0),
        (FieldType::Bytes, w) => json!(base64(bytes_of(w, field.json)?)),
        (FieldType::Time, w) => time(bytes_of(w, field.json)?)?,
        (FieldType::Quantity, w) => quantity(bytes_of(w, field.json)?)?,
        (FieldType::IntOrString, w) => int_or_string(bytes_of(w, field.json)?)?,
        (FieldType::Message(name), w) => message(name, bytes_of(w, field.json)?, depth + 1)?,
        _ => return Err(err(format!("{}: unexpected wire type", field.json))),
    })
}

fn is_zero(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_i64() == Some(0),
        _ => false,
    }
}

/// Decodes one message of type `name` into a JSON object.
fn message(name: &str, bytes: &[u8], depth: usize) -> Result<Value, ProtobufError> {
    if depth > MAX_DEPTH {
        return Err(err("nested too deeply"));
    }
    let table = schema().get(name).ok_or_else(|| {
        err(format!(
            "Brink cannot decode {name} from protobuf; send JSON"
        ))
    })?;
    let mut out = Map::new();
    let mut reader = Reader { bytes, at: 0 };
    while let Some((tag, wire)) = reader.next()? {
        let Some(field) = table.get(&tag) else {
            // The Go encoder writes every non-pointer field, set or not; a field
            // outside the table that carries nothing is skipped, one that carries
            // data is refused rather than dropped.
            match wire {
                Wire::Varint(0) => continue,
                Wire::Bytes([]) => continue,
                _ => {
                    return Err(err(format!(
                        "field {tag} of {name} is not one Brink decodes from protobuf; send JSON"
                    )));
                }
            }
        };
        match &field.ty {
            FieldType::MapStr | FieldType::MapBytes | FieldType::MapQuantity => {
                let (key, value) = entry(bytes_of(&wire, field.json)?)?;
                let value = match (&field.ty, value) {
                    (_, None) => json!(""),
                    (FieldType::MapStr, Some(w)) => json!(text(bytes_of(&w, field.json)?)?),
                    (FieldType::MapBytes, Some(w)) => json!(base64(bytes_of(&w, field.json)?)),
                    (_, Some(w)) => quantity(bytes_of(&w, field.json)?)?,
                };
                if let Some(m) = out
                    .entry(field.json)
                    .or_insert_with(|| json!({}))
                    .as_object_mut()
                {
                    m.insert(key, value);
                }
            }
            _ if field.repeated => {
                let value = scalar(field, &wire, depth)?;
                if let Some(a) = out
                    .entry(field.json)
                    .or_insert_with(|| json!([]))
                    .as_array_mut()
                {
                    a.push(value);
                }
            }
            _ => {
                let value = scalar(field, &wire, depth)?;
                if field.keep_zero || !is_zero(&value) {
                    out.insert(field.json.to_owned(), value);
                }
            }
        }
    }
    Ok(Value::Object(out))
}

/// Decodes a protobuf request body (magic, `runtime.Unknown`, object) into the JSON
/// object it encodes, `apiVersion` and `kind` included.
pub fn decode(body: &[u8]) -> Result<Value, ProtobufError> {
    let rest = body
        .strip_prefix(MAGIC)
        .ok_or_else(|| err("missing the k8s\\0 prefix"))?;
    let envelope = message("Unknown", rest, 0)?;
    let api_version = envelope
        .pointer("/typeMeta/apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let kind = envelope
        .pointer("/typeMeta/kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    if let Some(encoding) = envelope.get("contentEncoding").and_then(Value::as_str)
        && !encoding.is_empty()
    {
        return Err(err(format!(
            "content encoding {encoding:?} is not supported"
        )));
    }
    let raw = envelope
        .get("raw")
        .and_then(Value::as_str)
        .map(|b| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.decode(b)
        })
        .transpose()
        .map_err(|_| err("raw bytes"))?
        .unwrap_or_default();
    if kind.is_empty() {
        return Err(err("the envelope names no kind"));
    }
    let mut object = message(&kind, &raw, 1)?;
    if let Some(m) = object.as_object_mut() {
        m.insert("apiVersion".into(), json!(api_version));
        m.insert("kind".into(), json!(kind));
    }
    Ok(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }

    fn bytes_field(tag: u64, data: &[u8], out: &mut Vec<u8>) {
        varint(tag << 3 | 2, out);
        varint(data.len() as u64, out);
        out.extend_from_slice(data);
    }

    fn int_field(tag: u64, v: u64, out: &mut Vec<u8>) {
        varint(tag << 3, out);
        varint(v, out);
    }

    fn envelope(api_version: &str, kind: &str, raw: &[u8]) -> Vec<u8> {
        let mut type_meta = Vec::new();
        bytes_field(1, api_version.as_bytes(), &mut type_meta);
        bytes_field(2, kind.as_bytes(), &mut type_meta);
        let mut unknown = Vec::new();
        bytes_field(1, &type_meta, &mut unknown);
        bytes_field(2, raw, &mut unknown);
        bytes_field(3, b"", &mut unknown);
        bytes_field(4, b"", &mut unknown);
        let mut out = MAGIC.to_vec();
        out.extend(unknown);
        out
    }

    #[test]
    fn a_configmap_as_kubectl_encodes_it() {
        let mut meta = Vec::new();
        bytes_field(1, b"cfg", &mut meta);
        bytes_field(2, b"", &mut meta);
        bytes_field(3, b"shop", &mut meta);
        int_field(7, 0, &mut meta);
        bytes_field(8, b"", &mut meta);
        let mut entry = Vec::new();
        bytes_field(1, b"a", &mut entry);
        bytes_field(2, b"1", &mut entry);
        let mut cm = Vec::new();
        bytes_field(1, &meta, &mut cm);
        bytes_field(2, &entry, &mut cm);
        let object = decode(&envelope("v1", "ConfigMap", &cm)).expect("decode");
        assert_eq!(
            object,
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg", "namespace": "shop"}, "data": {"a": "1"}})
        );
    }

    #[test]
    fn a_deployment_keeps_zero_replicas_and_int_or_string() {
        let mut port = Vec::new();
        int_field(3, 8080, &mut port);
        let mut container = Vec::new();
        bytes_field(1, b"web", &mut container);
        bytes_field(2, b"r/hello:1", &mut container);
        bytes_field(6, &port, &mut container);
        let mut pod_spec = Vec::new();
        bytes_field(2, &container, &mut pod_spec);
        let mut template = Vec::new();
        bytes_field(2, &pod_spec, &mut template);
        let mut surge = Vec::new();
        int_field(1, 1, &mut surge);
        bytes_field(3, b"25%", &mut surge);
        let mut rolling = Vec::new();
        bytes_field(2, &surge, &mut rolling);
        let mut strategy = Vec::new();
        bytes_field(2, &rolling, &mut strategy);
        let mut spec = Vec::new();
        int_field(1, 0, &mut spec);
        bytes_field(3, &template, &mut spec);
        bytes_field(4, &strategy, &mut spec);
        let mut d = Vec::new();
        bytes_field(2, &spec, &mut d);
        let object = decode(&envelope("apps/v1", "Deployment", &d)).expect("decode");
        assert_eq!(object["spec"]["replicas"], 0);
        assert_eq!(
            object["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"],
            8080
        );
        assert_eq!(
            object["spec"]["strategy"]["rollingUpdate"]["maxSurge"],
            "25%"
        );
    }

    #[test]
    fn garbage_is_refused_by_name() {
        assert!(decode(b"not protobuf").is_err());
        assert!(decode(b"k8s\0\xff\xff\xff").is_err());
        let unknown_field = {
            let mut cm = Vec::new();
            bytes_field(99, b"x", &mut cm);
            envelope("v1", "ConfigMap", &cm)
        };
        let e = decode(&unknown_field).expect_err("field 99");
        assert!(e.0.contains("field 99 of ConfigMap"), "{e}");
        let e = decode(&envelope("v1", "Pod", b"")).expect_err("pod");
        assert!(e.0.contains("cannot decode Pod"), "{e}");
        // Every prefix of a valid body is refused or decodes; none panics.
        let mut meta = Vec::new();
        bytes_field(1, b"cfg", &mut meta);
        let mut cm = Vec::new();
        bytes_field(1, &meta, &mut cm);
        let body = envelope("v1", "ConfigMap", &cm);
        for cut in 0..body.len() {
            let _ = decode(&body[..cut]);
        }
    }
}
