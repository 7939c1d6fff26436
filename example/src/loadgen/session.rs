//! The protocol side of one load-generator call (one gRPC stream): which requests to send and
//! what each response means; pure and synchronous, the async shell is [`super::stream`].
//!
//! Rules:
//! - CDS and LDS subscribe with the legacy wildcard (an empty name list, as Envoy does); EDS and
//!   RDS use fixed names, or names derived from the parent type's resources, and wait for the
//!   first derived set before their first request;
//! - the node goes on the first request of the call only;
//! - every response is answered at once: an ACK, or a NACK when a parent-type resource does not
//!   decode or the type is not one the call carries;
//! - a response is a type's first, a change (its version differs from the previous response
//!   of that type on this call), or a repeat.
//!
//! Only names and versions are kept per type, never responses.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc;
use prost::Message;

use super::config::{LoadgenConfig, Protocol, XdsType};
use super::names;
use super::skim::{self, SotwResponse};

/// `google.rpc.Code.INVALID_ARGUMENT`, the code of a NACK.
const NACK_CODE: i32 = 3;

/// A request of either protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// A SotW request.
    Sotw(DiscoveryRequest),
    /// A delta request.
    Delta(DeltaDiscoveryRequest),
}

/// A response of either protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    /// A SotW response (resources kept encoded).
    Sotw(SotwResponse),
    /// A delta response.
    Delta(DeltaDiscoveryResponse),
}

/// How a response relates to the earlier ones of its type on the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receipt {
    /// The first response of the type.
    First,
    /// Its version differs from the previous response's.
    Changed,
    /// Same version as the previous response.
    Repeat,
    /// The type is not one the call carries.
    Unexpected,
}

/// What one response means to the run.
#[derive(Debug, Clone, PartialEq)]
pub struct Handled {
    /// The response's type, when it is one the call carries.
    pub xds_type: Option<XdsType>,
    /// `version_info` (SotW) or `system_version_info` (delta).
    pub version: String,
    /// `control_plane.identifier`, if set.
    pub control_plane: Option<String>,
    /// Encoded size of the response.
    pub bytes: usize,
    /// Resources in the response (SotW), or held for the type after applying it (delta, when
    /// the session counts held names; else the resources in the response).
    pub resources: usize,
    /// First, change, repeat or unexpected.
    pub receipt: Receipt,
    /// The ACK or NACK to send.
    pub reply: Request,
    /// Whether `reply` is a NACK.
    pub nack: bool,
    /// The child type and its new derived names, when this response changed them.
    pub derived: Option<(XdsType, BTreeSet<String>)>,
}

/// Where a type's subscribed names come from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum NameSource {
    /// The legacy wildcard (CDS, LDS).
    Wildcard,
    /// Names from the command line.
    Fixed(BTreeSet<String>),
    /// Names from the parent type's resources.
    Derived,
}

/// Per-type state of the call.
#[derive(Debug, Clone)]
struct TypeSession {
    xds_type: XdsType,
    source: NameSource,
    /// The names last requested; `None` before the first request.
    subscribed: Option<BTreeSet<String>>,
    /// Version of the previous response.
    version: Option<String>,
    /// SotW: the last version ACKed and the last nonce received.
    accepted: String,
    nonce: String,
    /// When a child derives its names from this type: resource name → names it refers to.
    held: Option<BTreeMap<String, BTreeSet<String>>>,
    /// Delta, when counting: the names of the resources held for the type.
    held_names: Option<BTreeSet<String>>,
}

/// Protocol state of one call.
#[derive(Debug, Clone)]
pub struct Session {
    protocol: Protocol,
    types: Vec<TypeSession>,
    /// The node, until the first request takes it.
    node: Option<Node>,
}

// === impl Session ===

impl Session {
    /// A call carrying `types` for a client whose node is `node`.
    pub fn new(config: &LoadgenConfig, types: &[XdsType], node: Node) -> Self {
        let types = types
            .iter()
            .map(|&t| TypeSession {
                xds_type: t,
                source: match (t.parent(), config.fixed_names(t)) {
                    (None, _) => NameSource::Wildcard,
                    (Some(_), Some(fixed)) => NameSource::Fixed(fixed.iter().cloned().collect()),
                    (Some(_), None) => NameSource::Derived,
                },
                subscribed: None,
                version: None,
                accepted: String::new(),
                nonce: String::new(),
                held: t.child().filter(|c| config.derives(*c)).map(|_| BTreeMap::new()),
                held_names: (config.protocol == Protocol::Delta && config.record.is_some()).then(BTreeSet::new),
            })
            .collect();
        Self { protocol: config.protocol, types, node: Some(node) }
    }

    /// Whether the call carries `t`.
    pub fn carries(&self, t: XdsType) -> bool {
        self.types.iter().any(|s| s.xds_type == t)
    }

    /// The first requests: every wildcard or fixed type, and each derived type whose names
    /// `derived` already knows (from another call of the same client).
    pub fn start(&mut self, mut derived: impl FnMut(XdsType) -> Option<BTreeSet<String>>) -> Vec<Request> {
        let mut out = Vec::new();
        for index in 0..self.types.len() {
            let names = match &self.types[index].source {
                NameSource::Wildcard => BTreeSet::new(),
                NameSource::Fixed(names) => names.clone(),
                NameSource::Derived => match derived(self.types[index].xds_type) {
                    Some(names) if !names.is_empty() => names,
                    _ => continue,
                },
            };
            out.push(self.subscribe(index, names));
        }
        out
    }

    /// A derived type's names changed: the request that subscribes to them, if the call carries
    /// the type and the subscription changes.
    pub fn set_derived(&mut self, t: XdsType, names: BTreeSet<String>) -> Option<Request> {
        let index = self.types.iter().position(|s| s.xds_type == t && s.source == NameSource::Derived)?;
        match &self.types[index].subscribed {
            None if names.is_empty() => None,
            Some(current) if *current == names => None,
            _ => Some(self.subscribe(index, names)),
        }
    }

    /// Records a response and returns what it means, with the ACK or NACK to send.
    pub fn on_response(&mut self, response: Response) -> Handled {
        let envelope = Envelope::from(response);
        let single = (self.types.len() == 1).then(|| self.types[0].xds_type);
        let xds_type = XdsType::from_type_url(&envelope.type_url).or(single.filter(|_| envelope.type_url.is_empty()));
        let Envelope { type_url, version, nonce, control_plane, bytes, update } = envelope;
        let in_response = update.len();
        let Some(index) = self.types.iter().position(|s| Some(s.xds_type) == xds_type) else {
            let reply = self.reply(None, type_url, &version, nonce, Some("unexpected type".to_owned()));
            let receipt = Receipt::Unexpected;
            return Handled {
                xds_type: None,
                version,
                control_plane,
                bytes,
                resources: in_response,
                receipt,
                reply,
                nack: true,
                derived: None,
            };
        };
        let state = &mut self.types[index];
        let receipt = match &state.version {
            None => Receipt::First,
            Some(previous) if *previous != version => Receipt::Changed,
            Some(_) => Receipt::Repeat,
        };
        state.version = Some(version.clone());
        let resources = match (&mut state.held_names, &update) {
            (Some(held), Update::Delta { added, removed, .. }) => {
                for name in removed {
                    held.remove(name);
                }
                held.extend(added.iter().map(|(name, _)| name.clone()));
                held.len()
            }
            _ => in_response,
        };
        let (error, derived) = match state.held.as_mut().map(|held| apply(state.xds_type, held, update)) {
            Some(Err(e)) => (Some(format!("cannot read {} resource: {e}", state.xds_type)), None),
            Some(Ok(derived)) => (None, derived.and_then(|names| state.xds_type.child().map(|c| (c, names)))),
            None => (None, None),
        };
        let nack = error.is_some();
        let reply = self.reply(Some(index), type_url, &version, nonce, error);
        Handled { xds_type, version, control_plane, bytes, resources, receipt, reply, nack, derived }
    }

    /// The ACK (no `error`) or NACK of a response of the type at `index` (`None`: unexpected).
    fn reply(
        &mut self,
        index: Option<usize>,
        type_url: String,
        version: &str,
        nonce: String,
        error: Option<String>,
    ) -> Request {
        let error_detail = error.map(|message| rpc::Status { code: NACK_CODE, message, details: vec![] });
        match self.protocol {
            Protocol::Delta => Request::Delta(DeltaDiscoveryRequest {
                type_url,
                response_nonce: nonce,
                error_detail,
                ..Default::default()
            }),
            Protocol::Sotw => {
                let mut request = DiscoveryRequest { type_url, error_detail, ..Default::default() };
                if let Some(state) = index.map(|i| &mut self.types[i]) {
                    if request.error_detail.is_none() {
                        version.clone_into(&mut state.accepted);
                    }
                    nonce.clone_into(&mut state.nonce);
                    state.accepted.clone_into(&mut request.version_info);
                    request.resource_names = state.subscribed.iter().flatten().cloned().collect();
                }
                request.response_nonce = nonce;
                Request::Sotw(request)
            }
        }
    }

    /// Subscribes the type at `index` to `names` (a whole list in SotW, a difference in delta).
    fn subscribe(&mut self, index: usize, names: BTreeSet<String>) -> Request {
        let node = self.node.take();
        let state = &mut self.types[index];
        let type_url = state.xds_type.type_url().to_owned();
        let previous = state.subscribed.replace(names.clone()).unwrap_or_default();
        match self.protocol {
            Protocol::Sotw => Request::Sotw(DiscoveryRequest {
                version_info: state.accepted.clone(),
                node,
                resource_names: names.into_iter().collect(),
                type_url,
                response_nonce: state.nonce.clone(),
                ..Default::default()
            }),
            Protocol::Delta => Request::Delta(DeltaDiscoveryRequest {
                node,
                type_url,
                resource_names_subscribe: names.difference(&previous).cloned().collect(),
                resource_names_unsubscribe: previous.difference(&names).cloned().collect(),
                ..Default::default()
            }),
        }
    }
}

/// The parts of a response of either protocol that the session uses.
struct Envelope {
    type_url: String,
    /// `version_info` or `system_version_info`.
    version: String,
    nonce: String,
    control_plane: Option<String>,
    /// Encoded size of the whole response.
    bytes: usize,
    update: Update,
}

impl From<Response> for Envelope {
    fn from(response: Response) -> Self {
        match response {
            Response::Sotw(r) => Envelope {
                bytes: r.encoded_len(),
                type_url: r.type_url,
                version: r.version_info,
                nonce: r.nonce,
                control_plane: r.control_plane.map(|c| c.identifier),
                update: Update::Full(r.resources),
            },
            Response::Delta(r) => {
                let bytes = r.encoded_len();
                let mut removed = r.removed_resources;
                removed.extend(r.removed_resource_names.into_iter().map(|n| n.name));
                Envelope {
                    bytes,
                    type_url: r.type_url,
                    version: r.system_version_info,
                    nonce: r.nonce,
                    control_plane: r.control_plane.map(|c| c.identifier),
                    update: Update::Delta {
                        added: r.resources.into_iter().map(|res| (res.name, res.resource)).collect(),
                        removed,
                    },
                }
            }
        }
    }
}

/// The resources of one response, as far as name derivation and counting care.
enum Update {
    /// SotW: the complete set, each an encoded `Any`.
    Full(Vec<bytes::Bytes>),
    /// Delta: added or changed resources (name, body), and removed names.
    Delta { added: Vec<(String, Option<Any>)>, removed: Vec<String> },
}

impl Update {
    /// Resources in the response.
    fn len(&self) -> usize {
        match self {
            Update::Full(resources) => resources.len(),
            Update::Delta { added, .. } => added.len(),
        }
    }
}

/// Applies a parent-type response to `held` (resource name → names it refers to) and returns
/// the derived child names, or `None` when a state-of-the-world CDS response names the same
/// clusters as the held ones (the common case: most updates change endpoints, not clusters;
/// the check allocates only the names, not the maps).
fn apply(
    t: XdsType,
    held: &mut BTreeMap<String, BTreeSet<String>>,
    update: Update,
) -> Result<Option<BTreeSet<String>>, prost::DecodeError> {
    let refers = |any: &Any| -> Result<(String, BTreeSet<String>), prost::DecodeError> {
        let name = names::resource_name(any)?;
        let children = match t {
            XdsType::Lds => names::route_names(any)?,
            _ => BTreeSet::from([name.clone()]),
        };
        Ok((name, children))
    };
    let refers_encoded = |encoded: &bytes::Bytes| -> Result<(String, BTreeSet<String>), prost::DecodeError> {
        match t {
            XdsType::Lds => refers(&Any::decode(encoded.as_ref())?),
            _ => {
                let name = names::name_in(&skim::any_value(encoded)?)?;
                Ok((name.clone(), BTreeSet::from([name])))
            }
        }
    };
    match update {
        Update::Full(resources) => {
            if t != XdsType::Lds && !held.is_empty() && held.len() == resources.len() {
                let mut same = true;
                for encoded in &resources {
                    if !held.contains_key(&names::name_in(&skim::any_value(encoded)?)?) {
                        same = false;
                        break;
                    }
                }
                if same {
                    return Ok(None);
                }
            }
            *held = resources.iter().map(refers_encoded).collect::<Result<_, _>>()?;
        }
        Update::Delta { added, removed } => {
            let added: Vec<_> =
                added.iter().filter_map(|(_, any)| any.as_ref()).map(refers).collect::<Result<_, _>>()?;
            for name in &removed {
                held.remove(name);
            }
            held.extend(added);
        }
    }
    Ok(Some(held.values().flatten().cloned().collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Transport;
    use crate::snapshot::{self, CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, SnapshotSpec};
    use envoy_types::pb::envoy::config::core::v3::ControlPlane;
    use envoy_types::pb::envoy::service::discovery::v3::Resource;

    fn config(protocol: Protocol, types: &[XdsType]) -> LoadgenConfig {
        let mut c = LoadgenConfig { protocol, mode: Transport::Ads, types: types.to_vec(), ..Default::default() };
        c.validate().unwrap();
        c
    }

    fn clusters(n: usize) -> Vec<Any> {
        let s = snapshot::build(&SnapshotSpec { clusters: n, listeners: 1, endpoints: vec![] }, "v", 1);
        s.resources_of(CLUSTER_TYPE).unwrap().values().cloned().collect()
    }

    fn sotw(type_url: &str, version: &str, nonce: &str, resources: Vec<Any>) -> Response {
        Response::Sotw(SotwResponse {
            version_info: version.into(),
            resources: resources.iter().map(|a| bytes::Bytes::from(a.encode_to_vec())).collect(),
            type_url: type_url.into(),
            nonce: nonce.into(),
            control_plane: Some(ControlPlane { identifier: "id".into() }),
        })
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn sotw_ads_derives_eds_from_cds_and_acks() {
        let c = config(Protocol::Sotw, &[XdsType::Cds, XdsType::Eds]);
        let mut s = Session::new(&c, &c.types, Node { id: "n".into(), ..Default::default() });
        let first = s.start(|_| None);
        assert_eq!(first.len(), 1, "EDS waits for CDS");
        let Request::Sotw(cds) = &first[0] else { panic!() };
        assert_eq!((cds.type_url.as_str(), cds.node.is_some(), cds.resource_names.len()), (CLUSTER_TYPE, true, 0));

        let h = s.on_response(sotw(CLUSTER_TYPE, "v1", "1", clusters(2)));
        assert_eq!((h.receipt, h.nack, h.control_plane.as_deref()), (Receipt::First, false, Some("id")));
        assert!(h.bytes > 0);
        let Request::Sotw(ack) = &h.reply else { panic!() };
        assert_eq!((ack.version_info.as_str(), ack.response_nonce.as_str()), ("v1", "1"));
        let (child, names) = h.derived.unwrap();
        assert_eq!((child, names.clone()), (XdsType::Eds, set(&["cluster_0", "cluster_1"])));

        let Some(Request::Sotw(eds)) = s.set_derived(XdsType::Eds, names.clone()) else { panic!() };
        assert_eq!(eds.resource_names, ["cluster_0", "cluster_1"]);
        assert!(eds.node.is_none(), "node only on the first request");
        assert!(s.set_derived(XdsType::Eds, names).is_none(), "unchanged");

        let h = s.on_response(sotw(ENDPOINT_TYPE, "v1", "2", vec![]));
        assert_eq!(h.receipt, Receipt::First);
        let Request::Sotw(ack) = &h.reply else { panic!() };
        assert_eq!(ack.resource_names, ["cluster_0", "cluster_1"]);
        assert_eq!(s.on_response(sotw(ENDPOINT_TYPE, "v1", "3", vec![])).receipt, Receipt::Repeat);
        assert_eq!(s.on_response(sotw(ENDPOINT_TYPE, "v2", "4", vec![])).receipt, Receipt::Changed);
    }

    #[test]
    fn sotw_cds_with_the_same_clusters_derives_nothing_new() {
        let c = config(Protocol::Sotw, &[XdsType::Cds, XdsType::Eds]);
        let mut s = Session::new(&c, &c.types, Node::default());
        s.start(|_| None);
        let first = s.on_response(sotw(CLUSTER_TYPE, "v1", "1", clusters(2)));
        assert_eq!(first.derived.map(|(_, n)| n), Some(set(&["cluster_0", "cluster_1"])));
        let same = s.on_response(sotw(CLUSTER_TYPE, "v2", "2", clusters(2)));
        assert_eq!((same.receipt, same.nack, same.derived), (Receipt::Changed, false, None));
        let more = s.on_response(sotw(CLUSTER_TYPE, "v3", "3", clusters(3)));
        assert_eq!(more.derived.map(|(_, n)| n.len()), Some(3), "a cluster added is derived");
    }

    #[test]
    fn sotw_nack_keeps_the_accepted_version() {
        let c = config(Protocol::Sotw, &[XdsType::Cds, XdsType::Eds]);
        let mut s = Session::new(&c, &c.types, Node::default());
        s.start(|_| None);
        s.on_response(sotw(CLUSTER_TYPE, "v1", "1", clusters(1)));
        let garbage = Any { type_url: CLUSTER_TYPE.into(), value: vec![0xff, 0xff] };
        let h = s.on_response(sotw(CLUSTER_TYPE, "v2", "2", vec![garbage]));
        assert!(h.nack);
        let Request::Sotw(nack) = &h.reply else { panic!() };
        assert_eq!((nack.version_info.as_str(), nack.response_nonce.as_str()), ("v1", "2"));
        assert!(nack.error_detail.is_some());
        let h = s.on_response(sotw(LISTENER_TYPE, "v1", "3", vec![]));
        assert_eq!((h.receipt, h.nack, h.xds_type), (Receipt::Unexpected, true, None));
    }

    #[test]
    fn delta_subscribes_differences_and_tracks_removals() {
        let c = config(Protocol::Delta, &[XdsType::Cds, XdsType::Eds]);
        let mut s = Session::new(&c, &c.types, Node::default());
        let first = s.start(|_| None);
        let Request::Delta(cds) = &first[0] else { panic!() };
        assert!(cds.resource_names_subscribe.is_empty() && cds.node.is_some());
        let resources: Vec<Resource> =
            clusters(3).into_iter().map(|a| Resource { resource: Some(a), ..Default::default() }).collect();
        let h = s.on_response(Response::Delta(DeltaDiscoveryResponse {
            system_version_info: "v1".into(),
            resources,
            type_url: CLUSTER_TYPE.into(),
            nonce: "1".into(),
            ..Default::default()
        }));
        let Request::Delta(ack) = &h.reply else { panic!() };
        assert_eq!(ack.response_nonce, "1");
        assert!(ack.resource_names_subscribe.is_empty() && ack.error_detail.is_none());
        let names = h.derived.unwrap().1;
        let Some(Request::Delta(eds)) = s.set_derived(XdsType::Eds, names) else { panic!() };
        assert_eq!(eds.resource_names_subscribe, ["cluster_0", "cluster_1", "cluster_2"]);

        let h = s.on_response(Response::Delta(DeltaDiscoveryResponse {
            system_version_info: "v2".into(),
            type_url: CLUSTER_TYPE.into(),
            removed_resources: vec!["cluster_1".into()],
            nonce: "2".into(),
            ..Default::default()
        }));
        assert_eq!(h.receipt, Receipt::Changed);
        let names = h.derived.unwrap().1;
        assert_eq!(names, set(&["cluster_0", "cluster_2"]));
        let Some(Request::Delta(change)) = s.set_derived(XdsType::Eds, names) else { panic!() };
        assert!(change.resource_names_subscribe.is_empty());
        assert_eq!(change.resource_names_unsubscribe, ["cluster_1"]);
    }

    #[test]
    fn per_type_call_uses_known_derived_names_and_fixed_names() {
        let mut c = config(Protocol::Sotw, &[XdsType::Cds, XdsType::Eds]);
        c.mode = Transport::PerType;
        let mut eds = Session::new(&c, &[XdsType::Eds], Node::default());
        assert!(eds.carries(XdsType::Eds) && !eds.carries(XdsType::Cds));
        let first = eds.start(|t| (t == XdsType::Eds).then(|| set(&["a"])));
        let Request::Sotw(r) = &first[0] else { panic!() };
        assert_eq!(r.resource_names, ["a"]);
        // A per-type response may leave out the type URL.
        assert_eq!(eds.on_response(sotw("", "v1", "1", vec![])).xds_type, Some(XdsType::Eds));

        let mut c = config(Protocol::Delta, &[XdsType::Eds, XdsType::Cds]);
        c.eds_names = Some(vec!["x".into()]);
        let mut s = Session::new(&c, &c.types, Node::default());
        assert_eq!(s.start(|_| None).len(), 2);
        let h = s.on_response(sotw_as_delta(CLUSTER_TYPE, "v1", clusters(1)));
        assert!(h.derived.is_none(), "EDS names are fixed: CDS is not tracked");
    }

    fn sotw_as_delta(type_url: &str, version: &str, resources: Vec<Any>) -> Response {
        let resources = resources.into_iter().map(|a| Resource { resource: Some(a), ..Default::default() }).collect();
        Response::Delta(DeltaDiscoveryResponse {
            system_version_info: version.into(),
            resources,
            type_url: type_url.into(),
            nonce: "n".into(),
            ..Default::default()
        })
    }
}
