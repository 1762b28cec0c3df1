//! Typed views of the Kubernetes objects kr-tunneld reads (SPEC K-5), and the lenient decoders
//! for list pages and watch events.
//!
//! Core module: pure decoding. It must never do I/O of its own, read the clock or log; the one
//! decoder that reads ([`decode_list_from`]) pulls bytes from a reader the caller hands it (the
//! shell's response body, or a slice). Only the fields we use are decoded (a Node keeps only
//! what the overlay reads, see [`NODE_ANNOTATION_PREFIX`]);
//! unknown fields are ignored and every field has a default (and `null` means the default), so
//! partial objects decode. An object that still does not fit (a string where a list belongs) is
//! returned as [`Skipped`] with its name, never as an error for the whole list or stream (SPEC
//! R-1): the caller logs it and carries on.
//!
//! Field names and meanings follow the Kubernetes API reference (core/v1 Node and Service,
//! discovery.k8s.io/v1 EndpointSlice); payload shapes were checked against kube-apiserver v1.28.7
//! recordings (tests/data).

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, DeserializeOwned, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use super::Resource;

/// Decodes `null` as the field's default. The API server writes `null` for empty lists in some
/// places (`"endpoints":null` in an EndpointSlice bookmark), which plain `#[serde(default)]` rejects.
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// The part of `metadata` we use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    /// `metadata.name`.
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    /// `metadata.namespace`; empty for cluster-scoped objects (Node).
    #[serde(default, deserialize_with = "nullable")]
    pub namespace: String,
    /// `metadata.resourceVersion`: opaque, compare only for equality.
    #[serde(default, deserialize_with = "nullable")]
    pub resource_version: String,
    /// `metadata.labels`.
    #[serde(default, deserialize_with = "nullable")]
    pub labels: BTreeMap<String, String>,
    /// `metadata.annotations`.
    #[serde(default, deserialize_with = "nullable")]
    pub annotations: BTreeMap<String, String>,
    /// `metadata.creationTimestamp` (RFC 3339 in UTC to the second: compares as text).
    #[serde(default, deserialize_with = "nullable")]
    pub creation_timestamp: String,
    /// `metadata.uid`.
    #[serde(default, deserialize_with = "nullable")]
    pub uid: String,
}

impl ObjectMeta {
    /// The cache key: `name` for cluster-scoped objects, `namespace/name` otherwise; empty when
    /// the object has no name (such objects are skipped).
    pub fn key(&self) -> String {
        key_of(&self.namespace, &self.name)
    }
}

/// `namespace/name`, or `name` when there is no namespace, or "" when there is no name.
fn key_of(namespace: &str, name: &str) -> String {
    if name.is_empty() {
        String::new()
    } else if namespace.is_empty() {
        name.to_string()
    } else {
        format!("{namespace}/{name}")
    }
}

// ---------------------------------------------------------------------------------------------
// Node

/// A core/v1 Node, reduced to what tunnels need (SPEC N-1…N-5).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Node {
    /// Name, resourceVersion and the `kube-router.io/` annotations; labels and other
    /// annotations are dropped while decoding (see [`NODE_ANNOTATION_PREFIX`]).
    #[serde(default, deserialize_with = "node_metadata")]
    pub metadata: ObjectMeta,
    /// `spec`.
    #[serde(default, deserialize_with = "nullable")]
    pub spec: NodeSpec,
    /// `status`.
    #[serde(default, deserialize_with = "nullable")]
    pub status: NodeStatus,
}

/// Annotations of a Node that are kept: kube-router's (`kube-router.io/pod-cidrs`,
/// `kube-router.io/pod-cidr`, see [`crate::nodes`]). Every other annotation, and every label,
/// is dropped while decoding.
pub const NODE_ANNOTATION_PREFIX: &str = "kube-router.io/";

/// Decodes a Node's `metadata` and reduces it at once to what the overlay uses: the name, the
/// resourceVersion and the annotations under [`NODE_ANNOTATION_PREFIX`]. A kubelet-managed
/// Node carries a dozen labels and several annotations (CRI socket, CSI node ids, TTL), and
/// the watch cache holds every Node of the cluster. The rest is decoded and dropped object by
/// object, never kept; decoding it as a whole [`ObjectMeta`] first keeps one decoder in the
/// binary for all three kinds (a Node-only metadata type cost 12-19 KB of code, SPEC P-4), and
/// a Node whose labels or annotations are not string maps is still skipped as before.
fn node_metadata<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let mut m: ObjectMeta = nullable(d)?;
    m.labels = BTreeMap::new();
    m.annotations
        .retain(|k, _| k.starts_with(NODE_ANNOTATION_PREFIX));
    if m.annotations.is_empty() {
        // Free the node an emptied map may still hold.
        m.annotations = BTreeMap::new();
    }
    Ok(m)
}

/// `Node.spec`: the pod CIDRs, unparsed (bad entries are skipped later, with a warning naming
/// the node).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeSpec {
    /// `spec.podCIDR` (the first of `podCIDRs`, kept for old clusters).
    #[serde(default, deserialize_with = "nullable", rename = "podCIDR")]
    pub pod_cidr: String,
    /// `spec.podCIDRs` (at most one per family).
    #[serde(default, deserialize_with = "nullable", rename = "podCIDRs")]
    pub pod_cidrs: Vec<String>,
}

/// `Node.status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct NodeStatus {
    /// `status.addresses`, in the server's order (SPEC N-2 depends on the order).
    #[serde(default, deserialize_with = "nullable")]
    pub addresses: Vec<NodeAddress>,
}

/// One `status.addresses[]` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct NodeAddress {
    /// `InternalIP`, `ExternalIP`, `Hostname`, `InternalDNS`, `ExternalDNS`.
    #[serde(default, deserialize_with = "nullable", rename = "type")]
    pub type_: String,
    /// The address, unparsed.
    #[serde(default, deserialize_with = "nullable")]
    pub address: String,
}

impl Resource for Node {
    const PATH: &'static str = "/api/v1/nodes";
    const KIND: &'static str = "Node";
    fn key(&self) -> String {
        self.metadata.key()
    }
    fn resource_version(&self) -> &str {
        &self.metadata.resource_version
    }
}

// ---------------------------------------------------------------------------------------------
// Service

/// A core/v1 Service, reduced to what DSR needs (SPEC D-1, D-2).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Service {
    /// Namespace, name, resourceVersion, labels, annotations (`kube-router.io/service.dsr`).
    #[serde(default, deserialize_with = "nullable")]
    pub metadata: ObjectMeta,
    /// `spec`.
    #[serde(default, deserialize_with = "nullable")]
    pub spec: ServiceSpec,
    /// `status`.
    #[serde(default, deserialize_with = "nullable")]
    pub status: ServiceStatus,
}

/// `Service.spec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// `ClusterIP`, `NodePort`, `LoadBalancer`, `ExternalName` (empty = ClusterIP).
    #[serde(default, deserialize_with = "nullable", rename = "type")]
    pub type_: String,
    /// `spec.clusterIP` (`None` for headless services, literally).
    #[serde(default, deserialize_with = "nullable", rename = "clusterIP")]
    pub cluster_ip: String,
    /// `spec.externalIPs`, unparsed.
    #[serde(default, deserialize_with = "nullable", rename = "externalIPs")]
    pub external_ips: Vec<String>,
    /// `spec.ports`.
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<ServicePort>,
    /// `None` or `ClientIP` (empty = None).
    #[serde(default, deserialize_with = "nullable")]
    pub session_affinity: String,
    /// `spec.sessionAffinityConfig`.
    #[serde(default, deserialize_with = "nullable")]
    pub session_affinity_config: SessionAffinityConfig,
    /// `Cluster` or `Local` (empty = Cluster).
    #[serde(default, deserialize_with = "nullable")]
    pub external_traffic_policy: String,
}

/// One `spec.ports[]` entry. Numbers are `int32` in the API and kept as `i32` here; range checks
/// belong to the consumer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// Port name (required when there are several ports).
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    /// `TCP`, `UDP` or `SCTP`; empty means the API default, TCP.
    #[serde(default, deserialize_with = "nullable")]
    pub protocol: String,
    /// The service port.
    #[serde(default, deserialize_with = "nullable")]
    pub port: i32,
    /// `targetPort`: a number or a named container port; `None` when absent.
    #[serde(default, deserialize_with = "nullable")]
    pub target_port: Option<IntOrString>,
}

/// An `IntOrString` field (`targetPort`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntOrString {
    /// A number.
    Int(i32),
    /// A name.
    String(String),
}

impl<'de> Deserialize<'de> for IntOrString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = IntOrString;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an int32 or a string")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<IntOrString, E> {
                i32::try_from(v)
                    .map(IntOrString::Int)
                    .map_err(|_| E::custom(format!("{v} out of int32 range")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<IntOrString, E> {
                i32::try_from(v)
                    .map(IntOrString::Int)
                    .map_err(|_| E::custom(format!("{v} out of int32 range")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<IntOrString, E> {
                Ok(IntOrString::String(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// `spec.sessionAffinityConfig`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionAffinityConfig {
    /// `sessionAffinityConfig.clientIP`.
    #[serde(default, deserialize_with = "nullable", rename = "clientIP")]
    pub client_ip: ClientIpConfig,
}

/// `sessionAffinityConfig.clientIP`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientIpConfig {
    /// Stickiness timeout; `None` means the API default (10800 s).
    #[serde(default, deserialize_with = "nullable")]
    pub timeout_seconds: Option<i32>,
}

/// `Service.status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    /// `status.loadBalancer`.
    #[serde(default, deserialize_with = "nullable")]
    pub load_balancer: LoadBalancerStatus,
}

/// `status.loadBalancer`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct LoadBalancerStatus {
    /// `status.loadBalancer.ingress`.
    #[serde(default, deserialize_with = "nullable")]
    pub ingress: Vec<LoadBalancerIngress>,
}

/// One `status.loadBalancer.ingress[]` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerIngress {
    /// The ingress IP (empty for hostname-only ingress).
    #[serde(default, deserialize_with = "nullable")]
    pub ip: String,
    /// `VIP` or `Proxy`; `None` when absent (means VIP).
    #[serde(default, deserialize_with = "nullable")]
    pub ip_mode: Option<String>,
}

impl Resource for Service {
    const PATH: &'static str = "/api/v1/services";
    const KIND: &'static str = "Service";
    fn key(&self) -> String {
        self.metadata.key()
    }
    fn resource_version(&self) -> &str {
        &self.metadata.resource_version
    }
}

// ---------------------------------------------------------------------------------------------
// EndpointSlice

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A discovery.k8s.io/v1 EndpointSlice, reduced to what DSR needs (SPEC D-3, D-4).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    /// Namespace, name, resourceVersion, labels (see [`EndpointSlice::service_name`]).
    #[serde(default, deserialize_with = "nullable")]
    pub metadata: ObjectMeta,
    /// `IPv4`, `IPv6` or `FQDN`.
    #[serde(default, deserialize_with = "nullable")]
    pub address_type: String,
    /// `endpoints`.
    #[serde(default, deserialize_with = "nullable")]
    pub endpoints: Vec<Endpoint>,
    /// `ports`.
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<EndpointPort>,
}

impl EndpointSlice {
    /// The owning Service's name (label `kubernetes.io/service-name`), if labelled.
    pub fn service_name(&self) -> Option<&str> {
        self.metadata
            .labels
            .get(SERVICE_NAME_LABEL)
            .map(String::as_str)
    }
}

/// One `endpoints[]` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// Addresses, unparsed (one for IP address types).
    #[serde(default, deserialize_with = "nullable")]
    pub addresses: Vec<String>,
    /// Readiness conditions; each may be absent.
    #[serde(default, deserialize_with = "nullable")]
    pub conditions: EndpointConditions,
    /// The node hosting the endpoint, when known.
    #[serde(default, deserialize_with = "nullable")]
    pub node_name: Option<String>,
}

/// `endpoints[].conditions`. Absent means "unknown"; use the accessors, which apply the API's
/// documented interpretation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct EndpointConditions {
    /// `ready`.
    #[serde(default, deserialize_with = "nullable")]
    pub ready: Option<bool>,
    /// `serving`.
    #[serde(default, deserialize_with = "nullable")]
    pub serving: Option<bool>,
    /// `terminating`.
    #[serde(default, deserialize_with = "nullable")]
    pub terminating: Option<bool>,
}

impl EndpointConditions {
    /// `ready`; unknown is read as ready ("consumers should interpret this unknown state as
    /// ready", API reference).
    pub fn is_ready(&self) -> bool {
        self.ready.unwrap_or(true)
    }
    /// `serving`; unknown falls back to `ready` (the field postdates `ready`).
    pub fn is_serving(&self) -> bool {
        self.serving.unwrap_or_else(|| self.is_ready())
    }
    /// `terminating`; unknown is read as not terminating.
    pub fn is_terminating(&self) -> bool {
        self.terminating.unwrap_or(false)
    }
}

/// One `ports[]` entry of an EndpointSlice.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct EndpointPort {
    /// Matches the Service port's name.
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    /// `TCP`, `UDP` or `SCTP`; empty means TCP.
    #[serde(default, deserialize_with = "nullable")]
    pub protocol: String,
    /// The endpoint port; `None` means "all ports" in the API.
    #[serde(default, deserialize_with = "nullable")]
    pub port: Option<i32>,
}

impl Resource for EndpointSlice {
    const PATH: &'static str = "/apis/discovery.k8s.io/v1/endpointslices";
    const KIND: &'static str = "EndpointSlice";
    fn key(&self) -> String {
        self.metadata.key()
    }
    fn resource_version(&self) -> &str {
        &self.metadata.resource_version
    }
}

// ---------------------------------------------------------------------------------------------
// Status, list pages and watch events

/// A `Status` object: the body of an API error and the object of an `ERROR` watch event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// HTTP-like code (410 = Expired/Gone).
    #[serde(default, deserialize_with = "nullable")]
    pub code: u16,
    /// Machine-readable reason (`Expired`, `Gone`, `TooManyRequests`).
    #[serde(default, deserialize_with = "nullable")]
    pub reason: String,
    /// Human-readable message.
    #[serde(default, deserialize_with = "nullable")]
    pub message: String,
    /// `details` (only `retryAfterSeconds` is used).
    #[serde(default, deserialize_with = "nullable")]
    pub details: StatusDetails,
}

/// `Status.details`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusDetails {
    /// Server-suggested delay before retrying.
    #[serde(default, deserialize_with = "nullable")]
    pub retry_after_seconds: Option<u32>,
}

impl Status {
    /// Decodes an error response body; `None` when it is not a JSON `Status`.
    pub fn from_body(body: &[u8]) -> Option<Status> {
        from_source::<Status>(&mut &body[..], body.len().min(READ_BUFFER)).ok()
    }
}

/// An object that could not be decoded, with whatever identification was obtainable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// `namespace/name` or `name` (the cache key) when the metadata was readable, else empty.
    pub key: String,
    /// `metadata.resourceVersion` when readable, else empty.
    pub resource_version: String,
    /// Why it was skipped.
    pub reason: String,
}

impl Skipped {
    fn from_value(value: &Value, reason: String) -> Skipped {
        let meta = value.get("metadata");
        let field = |name: &str| {
            meta.and_then(|m| m.get(name))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        Skipped {
            key: key_of(&field("namespace"), &field("name")),
            resource_version: field("resourceVersion"),
            reason,
        }
    }

    /// How to name the object in a log line.
    pub fn name(&self) -> &str {
        if self.key.is_empty() {
            "(unnamed object)"
        } else {
            &self.key
        }
    }
}

/// Decodes one object leniently: `Err(Skipped)` when it does not fit `T` or has no name.
fn decode_object<T: DeserializeOwned + Resource>(value: &Value) -> Result<T, Skipped> {
    match T::deserialize(value) {
        Ok(obj) if obj.key().is_empty() => {
            Err(Skipped::from_value(value, "no metadata.name".to_string()))
        }
        Ok(obj) => Ok(obj),
        Err(e) => Err(Skipped::from_value(value, e.to_string())),
    }
}

/// A sequence whose elements are decoded one by one, each either into `T` or into a
/// [`Skipped`], so one bad element cannot fail the sequence.
struct LenientSeq<T>(Vec<Result<T, Skipped>>);

impl<'de, T: Resource> Deserialize<'de> for LenientSeq<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Resource> Visitor<'de> for V<T> {
            type Value = LenientSeq<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of objects")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(LenientSeq(Vec::new()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                // One element at a time through a `Value`, so peak memory is one object, and
                // a type mismatch inside an element is that element's problem only.
                while let Some(value) = seq.next_element::<Value>()? {
                    out.push(decode_object::<T>(&value));
                }
                Ok(LenientSeq(out))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// One page of a list response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPage<T> {
    /// The decoded objects, in server order.
    pub items: Vec<T>,
    /// Objects that could not be decoded.
    pub skipped: Vec<Skipped>,
    /// `metadata.resourceVersion` of the list: where the following watch starts.
    pub resource_version: String,
    /// `metadata.continue`: non-empty when more pages follow.
    pub continue_token: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListMeta {
    #[serde(default, deserialize_with = "nullable")]
    resource_version: String,
    #[serde(default, deserialize_with = "nullable", rename = "continue")]
    continue_token: String,
}

#[derive(Deserialize)]
#[serde(bound = "T: Resource")]
struct ListEnvelope<T> {
    kind: Option<String>,
    metadata: Option<ListMeta>,
    /// `None` only when the field is missing (`null` is an empty list).
    #[serde(default, deserialize_with = "present")]
    items: Option<LenientSeq<T>>,
}

fn present<'de, D: Deserializer<'de>, T: Resource>(
    d: D,
) -> Result<Option<LenientSeq<T>>, D::Error> {
    LenientSeq::deserialize(d).map(Some)
}

/// Decodes one JSON text from `source` (all of it: only whitespace may follow). Every JSON
/// text kr-tunneld reads comes through here with the same source type, `dyn Read` behind a
/// buffer, so serde_json's parser is compiled into the binary once (SPEC P-4's size limit),
/// not once per kind of source.
fn from_source<T: DeserializeOwned>(
    source: &mut dyn std::io::Read,
    buffer: usize,
) -> Result<T, serde_json::Error> {
    let mut de =
        serde_json::Deserializer::from_reader(std::io::BufReader::with_capacity(buffer, source));
    let value = T::deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

/// The read buffer of a decode: a list page from the network reads through this much; a text
/// already in memory is copied through at most this much at a time.
pub const READ_BUFFER: usize = 16 << 10;

/// Decodes a list response body (`NodeList`, `ServiceList`, `EndpointSliceList`). Fails only
/// when the body is not a JSON list at all; bad items become [`ListPage::skipped`].
pub fn decode_list<T: Resource>(body: &[u8]) -> Result<ListPage<T>, String> {
    decode_list_from(&mut &body[..], body.len().min(READ_BUFFER)).map_err(|e| e.to_string())
}

/// [`decode_list`] from a reader, decoding as the bytes arrive: the shell passes the response
/// body, so a page is never held whole, only a read buffer of `buffer` bytes and one object at
/// a time (as a `Value`, then typed). An I/O error of the source comes back as a `serde_json`
/// error with [`serde_json::Error::is_io`]; converting it into an `io::Error` gives the
/// original back.
pub fn decode_list_from<T: Resource>(
    source: &mut dyn std::io::Read,
    buffer: usize,
) -> Result<ListPage<T>, serde_json::Error> {
    let env: ListEnvelope<T> = from_source(source, buffer)?;
    let bad = |m: String| <serde_json::Error as de::Error>::custom(m);
    // SPEC S-4: only a list of this kind (or a generic `List`) may replace the cache; a
    // `Status` or a proxy's JSON error that slipped through with a 200 is an error.
    match env.kind.as_deref() {
        Some(k) if k == "List" || k.strip_suffix("List") == Some(T::KIND) => {}
        other => {
            return Err(bad(format!(
                "expected a {}List, got kind {}",
                T::KIND,
                other.unwrap_or("(none)")
            )))
        }
    }
    let meta = env
        .metadata
        .ok_or_else(|| bad("no metadata in list".into()))?;
    let items = env.items.ok_or_else(|| bad("no items in list".into()))?;
    let mut skipped = Vec::new();
    let mut items_out = Vec::new();
    for r in items.0 {
        match r {
            Ok(obj) => items_out.push(obj),
            Err(s) => skipped.push(s),
        }
    }
    Ok(ListPage {
        items: items_out,
        skipped,
        resource_version: meta.resource_version,
        continue_token: meta.continue_token,
    })
}

/// One decoded line of a watch stream.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent<T> {
    /// `ADDED`.
    Added(T),
    /// `MODIFIED`.
    Modified(T),
    /// `DELETED` (the object as it was at deletion).
    Deleted(T),
    /// `BOOKMARK`: only a newer resourceVersion.
    Bookmark(String),
    /// `ERROR` with a `Status` object (code 410 means the resourceVersion expired).
    Error(Status),
    /// An `ADDED`/`MODIFIED`/`DELETED` whose object could not be decoded.
    Skipped {
        /// The event type.
        type_: String,
        /// The object's identification and the reason.
        skipped: Skipped,
    },
    /// An event type we do not know.
    Unknown(String),
}

#[derive(Deserialize)]
struct RawEvent {
    #[serde(rename = "type")]
    type_: String,
    #[serde(default)]
    object: Value,
}

/// Decodes one watch line (`{"type":…,"object":…}`). `Err` means the line is not a watch event
/// at all (not JSON, or no `type`): the stream cannot be trusted past it.
pub fn decode_event<T: Resource>(line: &[u8]) -> Result<WatchEvent<T>, String> {
    let raw: RawEvent =
        from_source(&mut &line[..], line.len().min(READ_BUFFER)).map_err(|e| e.to_string())?;
    // SPEC S-4: an object of another kind is not an event of this watch (a proxy or a broken
    // server); the stream cannot be trusted, and the cache must not change.
    if matches!(raw.type_.as_str(), "ADDED" | "MODIFIED" | "DELETED") {
        if let Some(k) = raw.object.get("kind").and_then(Value::as_str) {
            if k != T::KIND {
                return Err(format!(
                    "{} event of a {k}, expected a {}",
                    raw.type_,
                    T::KIND
                ));
            }
        }
    }
    let object = |ev: fn(T) -> WatchEvent<T>| match decode_object::<T>(&raw.object) {
        Ok(obj) => ev(obj),
        Err(skipped) => WatchEvent::Skipped {
            type_: raw.type_.clone(),
            skipped,
        },
    };
    Ok(match raw.type_.as_str() {
        "ADDED" => object(WatchEvent::Added),
        "MODIFIED" => object(WatchEvent::Modified),
        "DELETED" => object(WatchEvent::Deleted),
        "BOOKMARK" => WatchEvent::Bookmark(
            raw.object
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        ),
        "ERROR" => WatchEvent::Error(Status::deserialize(&raw.object).unwrap_or_default()),
        other => WatchEvent::Unknown(other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIST_NODES: &str = include_str!("../../tests/data/list-nodes.json");
    const LIST_SERVICES: &str = include_str!("../../tests/data/list-services.json");
    const LIST_SLICES: &str = include_str!("../../tests/data/list-endpointslices.json");
    const WATCH_NODES: &str = include_str!("../../tests/data/watch-nodes-http11.raw");
    const WATCH_SERVICES: &str = include_str!("../../tests/data/watch-services.jsonl");
    const WATCH_SLICES: &str = include_str!("../../tests/data/watch-endpointslices.jsonl");
    const WATCH_410: &str = include_str!("../../tests/data/watch-nodes-410.raw");

    /// The JSON lines of a `curl --raw` capture (chunk-size lines dropped).
    fn json_lines(raw: &str) -> Vec<&str> {
        raw.lines().filter(|l| l.starts_with('{')).collect()
    }

    #[test]
    fn recorded_node_list() {
        let page = decode_list::<Node>(LIST_NODES.as_bytes()).unwrap();
        assert_eq!(page.resource_version, "202");
        assert_eq!(page.continue_token, "");
        assert!(page.skipped.is_empty());
        assert_eq!(page.items.len(), 2);
        let n = &page.items[0];
        assert_eq!(n.key(), "node1");
        assert_eq!(n.resource_version(), "201");
        assert_eq!(n.metadata.annotations["kube-router.io/node.asn"], "64511");
        assert_eq!(n.spec.pod_cidr, "10.244.1.0/24");
        assert_eq!(n.spec.pod_cidrs, ["10.244.1.0/24", "fd00:10:244:1::/64"]);
        let addrs: Vec<_> = n
            .status
            .addresses
            .iter()
            .map(|a| (a.type_.as_str(), a.address.as_str()))
            .collect();
        assert_eq!(
            addrs,
            [
                ("InternalIP", "192.168.100.11"),
                ("InternalIP", "fd00::11"),
                ("ExternalIP", "203.0.113.11"),
                ("Hostname", "node1")
            ]
        );
    }

    #[test]
    fn recorded_node_watch() {
        let evs: Vec<WatchEvent<Node>> = json_lines(WATCH_NODES)
            .into_iter()
            .map(|l| decode_event(l.as_bytes()).unwrap())
            .collect();
        assert_eq!(evs.len(), 6);
        // The first one changed only a label, which a Node does not keep.
        assert!(
            matches!(&evs[0], WatchEvent::Modified(n) if n.key() == "node1"
            && n.resource_version() == "205" && n.metadata.annotations.len() == 1)
        );
        assert!(matches!(&evs[1], WatchEvent::Modified(n) if n.status.addresses.len() == 2));
        assert!(matches!(&evs[2], WatchEvent::Added(n) if n.key() == "node3"
            && n.spec.pod_cidrs == ["10.244.3.0/24"] && n.metadata.annotations.is_empty()));
        assert!(matches!(&evs[3], WatchEvent::Deleted(n) if n.resource_version() == "210"));
        assert_eq!(evs[4], WatchEvent::Bookmark("210".into()));
        assert_eq!(evs[5], WatchEvent::Bookmark("210".into()));
    }

    #[test]
    fn recorded_410_error_event() {
        let lines = json_lines(WATCH_410);
        assert_eq!(lines.len(), 1);
        match decode_event::<Node>(lines[0].as_bytes()).unwrap() {
            WatchEvent::Error(st) => {
                assert_eq!(st.code, 410);
                assert_eq!(st.reason, "Expired");
                assert!(st.message.contains("too old resource version"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn recorded_service_list_and_watch() {
        let page = decode_list::<Service>(LIST_SERVICES.as_bytes()).unwrap();
        assert_eq!(page.resource_version, "240");
        assert_eq!(page.items.len(), 2);
        let k = &page.items[0];
        assert_eq!(k.key(), "default/kubernetes");
        assert_eq!(k.spec.ports[0].target_port, Some(IntOrString::Int(6443)));
        assert!(k.status.load_balancer.ingress.is_empty());
        let web = &page.items[1];
        assert_eq!(web.key(), "default/web");
        assert_eq!(
            web.metadata.annotations["kube-router.io/service.dsr"],
            "tunnel"
        );
        assert_eq!(web.spec.type_, "ClusterIP");
        assert_eq!(web.spec.cluster_ip, "10.96.71.254");
        assert_eq!(web.spec.external_ips, ["203.0.113.50", "203.0.113.51"]);
        assert_eq!(web.spec.session_affinity, "None");
        assert_eq!(web.spec.ports[0].name, "http");
        assert_eq!(web.spec.ports[0].protocol, "TCP");
        assert_eq!(web.spec.ports[0].port, 80);

        let evs: Vec<WatchEvent<Service>> = WATCH_SERVICES
            .lines()
            .map(|l| decode_event(l.as_bytes()).unwrap())
            .collect();
        assert!(matches!(&evs[0], WatchEvent::Added(s) if s.spec.external_ips.len() == 1));
        assert!(matches!(&evs[1], WatchEvent::Modified(s) if s.spec.external_ips.len() == 2));
        assert_eq!(evs[2], WatchEvent::Bookmark("236".into()));
    }

    #[test]
    fn recorded_endpointslice_list_and_watch() {
        let page = decode_list::<EndpointSlice>(LIST_SLICES.as_bytes()).unwrap();
        assert_eq!(page.items.len(), 1);
        let s = &page.items[0];
        assert_eq!(s.key(), "default/web-abc12");
        assert_eq!(s.service_name(), Some("web"));
        assert_eq!(s.address_type, "IPv4");
        assert_eq!(s.endpoints.len(), 2);
        assert_eq!(s.endpoints[0].addresses, ["10.244.1.10"]);
        assert_eq!(s.endpoints[0].node_name.as_deref(), Some("node1"));
        assert!(s.endpoints[0].conditions.is_ready());
        assert!(!s.endpoints[1].conditions.is_ready());
        assert!(s.endpoints[1].conditions.is_serving());
        assert!(!s.endpoints[1].conditions.is_terminating());
        assert_eq!(s.ports[0].port, Some(8080));
        assert_eq!(s.ports[0].protocol, "TCP");

        let evs: Vec<WatchEvent<EndpointSlice>> = WATCH_SLICES
            .lines()
            .map(|l| decode_event(l.as_bytes()).unwrap())
            .collect();
        assert!(matches!(&evs[0], WatchEvent::Added(s) if s.endpoints[1].conditions.is_ready()));
        assert!(
            matches!(&evs[1], WatchEvent::Modified(s) if !s.endpoints[1].conditions.is_ready())
        );
        // The recorded bookmark carries "endpoints":null — it must still decode.
        assert_eq!(evs[2], WatchEvent::Bookmark("235".into()));
    }

    #[test]
    fn node_keeps_only_kube_router_annotations_and_no_labels() {
        let n: Node = serde_json::from_str(
            r#"{"metadata":{"name":"n1","resourceVersion":"7","uid":"u",
                "labels":{"kubernetes.io/hostname":"n1","topology.kubernetes.io/zone":"a"},
                "annotations":{"kube-router.io/pod-cidrs":"10.1.0.0/24,fd00::/64",
                    "node.alpha.kubernetes.io/ttl":"0","kube-router.io/pod-cidr":"10.1.0.0/24",
                    "kube-router.io\/x":"escaped","csi.volume.kubernetes.io/nodeid":"{\"a\":\"b\"}"}},
                "spec":{"podCIDR":"10.1.0.0/24","podCIDRs":["10.1.0.0/24"]}}"#,
        )
        .unwrap();
        assert_eq!(n.key(), "n1");
        assert_eq!(n.resource_version(), "7");
        assert!(n.metadata.labels.is_empty());
        let keys: Vec<&str> = n.metadata.annotations.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "kube-router.io/pod-cidr",
                "kube-router.io/pod-cidrs",
                "kube-router.io/x"
            ]
        );
        assert_eq!(
            n.metadata.annotations["kube-router.io/pod-cidrs"],
            "10.1.0.0/24,fd00::/64"
        );
        // The same through a `Value` (how list items and watch events are decoded).
        let v: Value = serde_json::from_str(
            r#"{"metadata":{"name":"n2","annotations":{"a":"1","kube-router.io/pod-cidr":"x"}}}"#,
        )
        .unwrap();
        let n = decode_object::<Node>(&v).unwrap();
        assert_eq!(n.metadata.annotations.len(), 1);
        // A Service keeps all of its metadata (DSR reads labels and annotations).
        let s = decode_object::<Service>(&json!({"metadata":{"name":"s","namespace":"ns",
            "labels":{"a":"1"},"annotations":{"b":"2"}}}))
        .unwrap();
        assert_eq!(
            (s.metadata.labels.len(), s.metadata.annotations.len()),
            (1, 1)
        );
        // null and absent annotations are empty; a non-string value is still a bad object,
        // kept or not.
        for meta in [r#"{"name":"n","annotations":null}"#, r#"{"name":"n"}"#] {
            let n: Node = serde_json::from_str(&format!(r#"{{"metadata":{meta}}}"#)).unwrap();
            assert!(n.metadata.annotations.is_empty());
        }
        for ann in [
            r#"{"a":1}"#,
            r#"{"kube-router.io/pod-cidr":null}"#,
            r#"["x"]"#,
        ] {
            let v: Value = serde_json::from_str(&format!(
                r#"{{"metadata":{{"name":"n","annotations":{ann}}}}}"#
            ))
            .unwrap();
            assert_eq!(decode_object::<Node>(&v).unwrap_err().key, "n", "{ann}");
        }
        // Every annotation the overlay reads is one that is kept.
        for ann in [crate::nodes::ANN_POD_CIDRS, crate::nodes::ANN_POD_CIDR] {
            assert!(ann.starts_with(NODE_ANNOTATION_PREFIX), "{ann}");
        }
    }

    #[test]
    fn partial_objects_decode_with_defaults() {
        let n: Node = serde_json::from_str(r#"{"metadata":{"name":"n"}}"#).unwrap();
        assert_eq!(n.key(), "n");
        assert!(n.spec.pod_cidrs.is_empty());
        let s: Service = serde_json::from_str(
            r#"{"metadata":{"name":"s","namespace":"ns","labels":null},"spec":{"ports":[{"port":53,"targetPort":"dns"}],"externalIPs":null},"status":null}"#,
        )
        .unwrap();
        assert_eq!(s.key(), "ns/s");
        assert_eq!(
            s.spec.ports[0].target_port,
            Some(IntOrString::String("dns".into()))
        );
        assert_eq!(s.spec.ports[0].protocol, "");
        let s: Service = serde_json::from_str(
            r#"{"metadata":{"name":"lb","namespace":"ns"},"spec":{"type":"LoadBalancer","sessionAffinity":"ClientIP","sessionAffinityConfig":{"clientIP":{"timeoutSeconds":300}},"externalTrafficPolicy":"Local"},"status":{"loadBalancer":{"ingress":[{"ip":"198.51.100.7","ipMode":"Proxy"},{"hostname":"x.example"}]}}}"#,
        )
        .unwrap();
        assert_eq!(
            s.spec.session_affinity_config.client_ip.timeout_seconds,
            Some(300)
        );
        assert_eq!(s.spec.external_traffic_policy, "Local");
        let ing = &s.status.load_balancer.ingress;
        assert_eq!(ing[0].ip, "198.51.100.7");
        assert_eq!(ing[0].ip_mode.as_deref(), Some("Proxy"));
        assert_eq!(ing[1].ip, "");
        let e: EndpointSlice =
            serde_json::from_str(r#"{"metadata":{"name":"e","namespace":"ns"},"endpoints":[{"addresses":["fd00::1"],"conditions":{}}],"ports":[{"port":null}]}"#).unwrap();
        assert!(e.endpoints[0].conditions.is_ready());
        assert!(e.endpoints[0].conditions.is_serving());
        assert_eq!(e.endpoints[0].node_name, None);
        assert_eq!(e.ports[0].port, None);
        assert_eq!(e.service_name(), None);
    }

    #[test]
    fn malformed_item_is_skipped_not_fatal() {
        let body = r#"{"kind":"NodeList","metadata":{"resourceVersion":"9","continue":"abc"},"items":[
            {"metadata":{"name":"good","resourceVersion":"5"}},
            {"metadata":{"name":"bad","resourceVersion":"6"},"spec":{"podCIDRs":"10.0.0.0/24"}},
            {"metadata":{"resourceVersion":"7"}},
            42,
            {"metadata":{"name":"good2"},"status":{"addresses":[{"type":"InternalIP","address":"10.0.0.2","extra":[1,2]}]}}
        ]}"#;
        let page = decode_list::<Node>(body.as_bytes()).unwrap();
        assert_eq!(page.continue_token, "abc");
        let keys: Vec<_> = page.items.iter().map(|n| n.key()).collect();
        assert_eq!(keys, ["good", "good2"]);
        assert_eq!(page.skipped.len(), 3);
        assert_eq!(page.skipped[0].key, "bad");
        assert_eq!(page.skipped[0].resource_version, "6");
        assert!(
            page.skipped[0].reason.contains("expected a sequence"),
            "{:?}",
            page.skipped[0]
        );
        assert_eq!(page.skipped[1].name(), "(unnamed object)");
        assert_eq!(page.skipped[2].name(), "(unnamed object)");
    }

    #[test]
    fn malformed_event_object_is_skipped_with_its_name() {
        let line = r#"{"type":"MODIFIED","object":{"metadata":{"name":"web","namespace":"prod","resourceVersion":"77"},"spec":{"ports":[{"port":"eighty"}]}}}"#;
        match decode_event::<Service>(line.as_bytes()).unwrap() {
            WatchEvent::Skipped { type_, skipped } => {
                assert_eq!(type_, "MODIFIED");
                assert_eq!(skipped.key, "prod/web");
                assert_eq!(skipped.resource_version, "77");
            }
            other => panic!("{other:?}"),
        }
        assert!(decode_event::<Node>(b"not json").is_err());
        assert!(decode_event::<Node>(br#"{"object":{}}"#).is_err());
        assert_eq!(
            decode_event::<Node>(br#"{"type":"WHATEVER","object":{}}"#).unwrap(),
            WatchEvent::Unknown("WHATEVER".into())
        );
        // Out-of-range targetPort and a non-integer port are object errors, not panics.
        let line = r#"{"type":"ADDED","object":{"metadata":{"name":"x","namespace":"n"},"spec":{"ports":[{"port":1,"targetPort":99999999999}]}}}"#;
        assert!(matches!(
            decode_event::<Service>(line.as_bytes()).unwrap(),
            WatchEvent::Skipped { .. }
        ));
    }

    #[test]
    fn list_that_is_not_a_list_is_an_error() {
        assert!(decode_list::<Node>(b"<html>").is_err());
        assert!(decode_list::<Node>(br#"{"items":[]}"#).is_err());
        let p = decode_list::<Node>(
            br#"{"kind":"NodeList","metadata":{"resourceVersion":"1"},"items":null}"#,
        )
        .unwrap();
        assert!(p.items.is_empty());
    }

    /// SPEC S-4: an HTTP 200 whose body is not a list of the expected kind (a `Status`, a
    /// proxy's JSON error, a list of something else, no `items`) is an error, never an empty
    /// list that would empty the cache.
    #[test]
    fn reply_that_is_not_a_list_of_the_kind_is_an_error() {
        for body in [
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","code":500}"#,
            r#"{"error":"upstream connect error","metadata":{}}"#,
            r#"{"kind":"NodeList","apiVersion":"v1","metadata":{"resourceVersion":"5"}}"#,
            r#"{"kind":"ServiceList","metadata":{"resourceVersion":"5"},"items":[]}"#,
            r#"{"metadata":{"resourceVersion":"5"},"items":[]}"#,
        ] {
            assert!(decode_list::<Node>(body.as_bytes()).is_err(), "{body}");
        }
        for body in [
            r#"{"kind":"NodeList","metadata":{"resourceVersion":"5"},"items":[]}"#,
            r#"{"kind":"NodeList","metadata":{"resourceVersion":"5"},"items":null}"#,
            r#"{"kind":"List","metadata":{"resourceVersion":"5"},"items":[]}"#,
        ] {
            let page = decode_list::<Node>(body.as_bytes()).unwrap();
            assert!(
                page.items.is_empty() && page.resource_version == "5",
                "{body}"
            );
        }
        // A watch event whose object is of another kind is not an event of this watch.
        for line in [
            r#"{"type":"DELETED","object":{"kind":"Service","metadata":{"name":"n1","namespace":"x"}}}"#,
            r#"{"type":"ADDED","object":{"kind":"Status","metadata":{"name":"n1"},"code":500}}"#,
        ] {
            assert!(decode_event::<Node>(line.as_bytes()).is_err(), "{line}");
        }
        let ok = r#"{"type":"DELETED","object":{"kind":"Node","metadata":{"name":"n1"}}}"#;
        assert!(matches!(
            decode_event::<Node>(ok.as_bytes()),
            Ok(WatchEvent::Deleted(_))
        ));
    }

    #[test]
    fn status_body() {
        let st = Status::from_body(
            br#"{"kind":"Status","code":504,"reason":"Timeout","details":{"retryAfterSeconds":1}}"#,
        )
        .unwrap();
        assert_eq!(st.code, 504);
        assert_eq!(st.details.retry_after_seconds, Some(1));
    }
}
