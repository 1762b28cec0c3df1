//! [`NetlinkKernel`]: the [`Kernel`] implementation over rtnetlink and generic netlink.
//!
//! Shell module: it reads with one dump per object type (SPEC P-2), sends what the plan says, in
//! the plan's order, batched where the order allows (SPEC P-1), and reports per op. What to do is
//! decided by the planner; the only choices made here are the error semantics of SPEC T-10:
//!
//! * `CreateTunnel` answered with EEXIST: the links are read again. Our own link with exactly the
//!   wanted attributes (and up) is success; anything else is reported as a clash, naming the link
//!   that holds the name or the address pair and whether it is foreign. Nothing is deleted.
//! * Deletes answered with ENOENT, ESRCH or ENODEV are success: the object is already gone.
//! * `AddRule` answered with EEXIST is success when the identical rule (our protocol included)
//!   exists.
//! * FOU: adding a port that exists (EEXIST, EALREADY, EADDRINUSE) is success when the same GUE
//!   port is open; deleting one that is not there is success (the kernel answers EINVAL for an
//!   unknown port, so the ports are read again to tell the cases apart).
//!
//! Routes name their device; the ifindex comes from the link list of the last dump. When a route
//! names a device the list does not know and links were created since that dump, the requests
//! queued so far are sent and the new links are looked up (by name, or with one more dump).
//!
//! Memory (SPEC P-4): dumps are decoded message by message as each datagram arrives, so the raw
//! kernel messages of a dump are never held together, and a dump made only to learn ifindexes
//! or to inspect one clash keeps no list of links. Requests are sent as soon as a whole batch
//! ([`BATCH_MESSAGES`], [`BATCH_BYTES`]) is queued, so `apply` holds at most one batch of them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use netlink_packet_core::DecodeError;

use super::fou::{fou_add, fou_del, fou_dump, parse_fou_port, FOU_GENL_NAME};
use super::genl::Genl;
use super::rtnl::{
    addr_dump, link_bind, link_change, link_create, link_delete, link_delete_group, link_dump,
    link_get, link_set_up, parse_addr, parse_link, parse_route, parse_rule, route_delete,
    route_dump, route_replace, rule_add, rule_delete, rule_dump, RTM_NEWADDR, RTM_NEWLINK,
    RTM_NEWROUTE, RTM_NEWRULE,
};
use super::socket::{
    DumpPart, NetlinkError, NlSocket, Request, BATCH_BYTES, BATCH_MESSAGES, NETLINK_ROUTE,
};
use crate::apply::{Kernel, KernelError};
use crate::model::{Actual, Addr, FouPort, Link, NextHop, Op, Ownership, Route, Rule, Tunnel};

/// The kernel, reached over netlink sockets of the calling thread's network namespace.
#[derive(Debug)]
pub struct NetlinkKernel {
    route: NlSocket,
    genl: Genl,
    /// Link name → ifindex, from the last link dump.
    index: HashMap<IfName, u32>,
    /// Links were created since `index` was filled (or it never was).
    index_stale: bool,
    /// How many links were created since the last dump: a few are looked up by name, many by
    /// one dump.
    created: usize,
    /// How many objects the last dumps returned: the capacity to start the next with.
    last: DumpSizes,
    /// Set when the daemon is to stop: `apply` sends no further batch (SPEC S-5).
    halt: Option<Arc<AtomicBool>>,
}

/// A link name as the kernel keeps it, at most `IFNAMSIZ - 1` = 15 bytes, held inline: the
/// name → ifindex map of thousands of links then allocates no strings (20 bytes an entry
/// instead of 32 plus a heap block).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct IfName {
    len: u8,
    bytes: [u8; IfName::MAX],
}

impl IfName {
    const MAX: usize = 15;

    /// `None` for a name no kernel link can have (longer than 15 bytes).
    fn new(name: &str) -> Option<IfName> {
        let b = name.as_bytes();
        let mut bytes = [0; IfName::MAX];
        bytes.get_mut(..b.len())?.copy_from_slice(b);
        Some(IfName {
            len: b.len() as u8,
            bytes,
        })
    }

    fn as_str(&self) -> &str {
        // Built from a `&str` of `len` bytes, so this is that string.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl std::fmt::Debug for IfName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

/// Objects returned by the last dump of each kind (capacity hints only).
#[derive(Debug, Default)]
struct DumpSizes {
    addrs: usize,
    routes: usize,
    rules: usize,
}

fn kerr(op: impl Into<String>, e: &NetlinkError) -> KernelError {
    KernelError {
        op: op.into(),
        errno: e.errno(),
        msg: e.message(),
    }
}

fn clash(op: &Op, msg: String) -> KernelError {
    KernelError {
        op: op.to_string(),
        errno: libc::EEXIST,
        msg,
    }
}

/// What to do with one queued request's result.
struct Pending {
    op: usize,
    req: Request,
}

impl AsRef<Request> for Pending {
    fn as_ref(&self) -> &Request {
        &self.req
    }
}

/// The requests queued for the next batch, in plan order.
#[derive(Default)]
struct Queue {
    pending: Vec<Pending>,
    /// Their size in a datagram.
    bytes: usize,
}

impl Queue {
    fn push(&mut self, op: usize, req: Request) {
        self.bytes += req.encoded_len();
        self.pending.push(Pending { op, req });
    }

    /// A whole batch is queued: sending it now changes neither what the kernel sees nor in
    /// which order, and keeps `apply` from holding thousands of requests.
    fn full(&self) -> bool {
        self.pending.len() >= BATCH_MESSAGES || self.bytes >= BATCH_BYTES
    }
}

/// What one dump attempt decoded: the objects kept, and the errors of the messages that could not
/// be decoded. The errors are logged once the dump is complete, so that an interrupted attempt
/// (dropped and repeated) warns about nothing.
struct Decoded<T> {
    items: Vec<T>,
    bad: Vec<DecodeError>,
}

impl<T> Decoded<T> {
    fn with_capacity(n: usize) -> Decoded<T> {
        Decoded {
            items: Vec::with_capacity(n),
            bad: Vec::new(),
        }
    }

    fn push(&mut self, r: Result<Option<T>, DecodeError>) {
        match r {
            Ok(Some(t)) => self.items.push(t),
            Ok(None) => {}
            Err(e) => self.bad.push(e),
        }
    }

    /// Warns about each message skipped (`what`: "a link") and returns the objects, without
    /// spare capacity (the caller may hold them for a while).
    fn finish(mut self, what: &str) -> Vec<T> {
        for e in &self.bad {
            log::warn!("skipping {what} the dump could not decode: {e}");
        }
        self.items.shrink_to_fit();
        self.items
    }
}

/// Dumps `req` and decodes each message of type `msg_type` as it arrives (`Ok(None)`: not
/// wanted), starting with room for `capacity` objects.
fn dump_decoded<T>(
    sock: &mut NlSocket,
    req: &Request,
    msg_type: u16,
    capacity: usize,
    mut decode: impl FnMut(&[u8]) -> Result<Option<T>, DecodeError>,
) -> Result<Decoded<T>, NetlinkError> {
    sock.dump_fold(
        req,
        || Decoded::with_capacity(capacity),
        |d, m| {
            if m.msg_type == msg_type {
                d.push(decode(m.payload));
            }
        },
    )
}

impl NetlinkKernel {
    /// Opens the rtnetlink and generic netlink sockets.
    pub fn open() -> Result<NetlinkKernel, KernelError> {
        let route = NlSocket::open(NETLINK_ROUTE).map_err(|e| kerr("open rtnetlink socket", &e))?;
        let genl = Genl::open().map_err(|e| kerr("open generic netlink socket", &e))?;
        Ok(NetlinkKernel {
            route,
            genl,
            index: HashMap::new(),
            index_stale: true,
            created: 0,
            last: DumpSizes::default(),
            halt: None,
        })
    }

    /// Makes `apply` stop between two batches once `flag` is set (SIGTERM in the middle of a
    /// long pass, SPEC S-5): the ops not sent yet are reported with [`KernelError::not_sent`].
    pub fn stop_on(&mut self, flag: Arc<AtomicBool>) {
        self.halt = Some(flag);
    }

    fn halted(&self) -> bool {
        self.halt
            .as_ref()
            .is_some_and(|h| h.load(Ordering::Relaxed))
    }

    /// Dumps all links and refreshes the name → ifindex map.
    pub fn links(&mut self) -> Result<Vec<Link>, KernelError> {
        // The map holds every link of the last dump (and the few learnt by name since).
        let capacity = self.index.len();
        self.dump_links(capacity, |_| true)
    }

    /// Dumps the links, refilling the name → ifindex map in place as they arrive, and returns the
    /// ones `keep` wants, in dump order. After a failed dump the map is empty and stale: nothing
    /// is known, and the next lookup dumps again.
    fn dump_links(
        &mut self,
        capacity: usize,
        mut keep: impl FnMut(&Link) -> bool,
    ) -> Result<Vec<Link>, KernelError> {
        let index = &mut self.index;
        let mut kept = Decoded::with_capacity(capacity);
        let res = self.route.dump_with(&link_dump(), |part| match part {
            DumpPart::Start => {
                index.clear();
                kept.items.clear();
                kept.bad.clear();
            }
            DumpPart::Message(m) if m.msg_type == RTM_NEWLINK => match parse_link(m.payload) {
                Ok(l) => {
                    if let Some(name) = IfName::new(&l.name) {
                        index.insert(name, l.index);
                    }
                    if keep(&l) {
                        kept.items.push(l);
                    }
                }
                Err(e) => kept.bad.push(e),
            },
            DumpPart::Message(_) => {}
        });
        if let Err(e) = res {
            self.index.clear();
            self.index_stale = true;
            return Err(kerr("dump links", &e));
        }
        self.index_stale = false;
        self.created = 0;
        Ok(kept.finish("a link"))
    }

    /// Dumps all addresses.
    pub fn addrs(&mut self) -> Result<Vec<Addr>, KernelError> {
        let out = dump_decoded(
            &mut self.route,
            &addr_dump(),
            RTM_NEWADDR,
            self.last.addrs,
            parse_addr,
        )
        .map_err(|e| kerr("dump addresses", &e))?
        .finish("an address");
        self.last.addrs = out.len();
        Ok(out)
    }

    /// Dumps the routes of `protocol` in every table and family; `links` names the devices.
    pub fn routes(&mut self, protocol: u8, links: &[Link]) -> Result<Vec<Route>, KernelError> {
        let names: HashMap<u32, &str> = links.iter().map(|l| (l.index, l.name.as_str())).collect();
        let out = dump_decoded(
            &mut self.route,
            &route_dump(protocol),
            RTM_NEWROUTE,
            self.last.routes,
            |p| {
                parse_route(p, &names).map(|r| r.filter(|route: &Route| route.protocol == protocol))
            },
        )
        .map_err(|e| kerr("dump routes", &e))?
        .finish("a route");
        self.last.routes = out.len();
        Ok(out)
    }

    /// Dumps the rules of `protocol` of every family.
    pub fn rules(&mut self, protocol: u8) -> Result<Vec<Rule>, KernelError> {
        let out = dump_decoded(
            &mut self.route,
            &rule_dump(),
            RTM_NEWRULE,
            self.last.rules,
            |p| parse_rule(p).map(|r| r.filter(|rule: &Rule| rule.protocol == protocol)),
        )
        .map_err(|e| kerr("dump rules", &e))?
        .finish("a rule");
        self.last.rules = out.len();
        Ok(out)
    }

    /// Dumps the FOU ports of both families. A kernel without the "fou" family has none.
    pub fn fou_ports(&mut self) -> Result<Vec<FouPort>, KernelError> {
        let decoded = self.genl.dump_fold(
            FOU_GENL_NAME,
            fou_dump,
            || Decoded::with_capacity(0),
            |d, m| d.push(parse_fou_port(m.payload)),
        );
        match decoded {
            Ok(d) => Ok(d.finish("a fou port")),
            Err(e) if e.errno() == libc::ENOENT => {
                log::debug!("no fou family (module not loaded?): no FOU ports");
                Ok(Vec::new())
            }
            Err(e) => Err(kerr("dump fou ports", &e)),
        }
    }

    /// Deletes every link of `group` in one request (see [`link_delete_group`]); an empty group
    /// is success. Meant for `kr-tunneld cleanup`, with the group of [`Ownership::link_group`].
    pub fn delete_link_group(&mut self, group: u32) -> Result<(), KernelError> {
        match self.route.request(&link_delete_group(group)) {
            Ok(_) => {
                self.index_stale = true;
                log::info!("delete link group {group}");
                Ok(())
            }
            Err(e) if e.errno() == libc::ENODEV => Ok(()),
            Err(e) => Err(kerr(format!("delete link group {group}"), &e)),
        }
    }

    /// Binds the tunnel `index` (attributes `t`) to the underlay device `oif`, see [`link_bind`].
    pub fn bind_tunnel(&mut self, index: u32, t: &Tunnel, oif: u32) -> Result<(), KernelError> {
        self.route
            .request(&link_bind(index, t, oif))
            .map(|_| ())
            .map_err(|e| kerr(format!("bind tunnel {} to ifindex {oif}", t.name), &e))
    }

    /// Sends the queued requests as one batch and records each outcome.
    fn flush(
        &mut self,
        own: &Ownership,
        ops: &[Op],
        queue: &mut Queue,
        failed: &mut Vec<(usize, KernelError)>,
    ) {
        if queue.pending.is_empty() {
            return;
        }
        let results = self.route.batch(&queue.pending);
        queue.bytes = 0;
        for (p, res) in queue.pending.drain(..).zip(results) {
            let op = &ops[p.op];
            let outcome = match res {
                Ok(()) => Ok(()),
                Err(e) => self.settle(own, op, &e),
            };
            match outcome {
                Ok(()) => log::info!("{op}"),
                Err(e) => failed.push((p.op, e)),
            }
        }
    }

    /// Applies SPEC T-10 to a failed rtnetlink op: `Ok` when the failure means the wanted state
    /// already holds.
    fn settle(&mut self, own: &Ownership, op: &Op, e: &NetlinkError) -> Result<(), KernelError> {
        let errno = e.errno();
        match op {
            Op::CreateTunnel(t) if errno == libc::EEXIST => self.create_exists(own, op, t),
            Op::DeleteTunnel { .. } | Op::DeleteRoute(_) | Op::DeleteRule(_)
                if matches!(errno, libc::ENOENT | libc::ESRCH | libc::ENODEV) =>
            {
                log::debug!("{op}: already gone");
                Ok(())
            }
            Op::AddRule(r) if errno == libc::EEXIST => {
                if self.rules(r.protocol)?.contains(r) {
                    log::debug!("{op}: already present");
                    Ok(())
                } else {
                    Err(clash(
                        op,
                        "a rule with the same selector exists with another protocol".into(),
                    ))
                }
            }
            _ => Err(kerr(op.to_string(), e)),
        }
    }

    /// EEXIST on create: compare with what holds the name or the address pair.
    fn create_exists(&mut self, own: &Ownership, op: &Op, t: &Tunnel) -> Result<(), KernelError> {
        let same_pair = |l: &Link| {
            l.tunnel
                .as_ref()
                .is_some_and(|x| x.family == t.family && x.local == t.local && x.remote == t.remote)
        };
        // Only the links that can explain the clash are kept (the dump refreshes the map too).
        let links = self.dump_links(2, |l| l.name == t.name || same_pair(l))?;
        if let Some(l) = links.iter().find(|l| l.name == t.name) {
            if !own.owns_link(l) {
                return Err(clash(
                    op,
                    format!(
                        "link {} exists and is not ours (kind {:?}, group {})",
                        l.name, l.kind, l.group
                    ),
                ));
            }
            if l.tunnel.as_ref() == Some(t) && l.up {
                log::debug!("{op}: already present");
                return Ok(());
            }
            return Err(clash(
                op,
                format!(
                    "our link {} exists with other attributes: {:?}",
                    l.name, l.tunnel
                ),
            ));
        }
        match links.iter().find(|l| same_pair(l)) {
            Some(l) => Err(clash(
                op,
                format!(
                    "{} link {} already tunnels {} to {}",
                    if own.owns_link(l) { "our" } else { "foreign" },
                    l.name,
                    t.local,
                    t.remote
                ),
            )),
            None => Err(clash(
                op,
                "exists (no link holds the name or the address pair)".into(),
            )),
        }
    }

    /// The links the kernel returns for one name (RTM_GETLINK, no dump), entered into the
    /// name → ifindex map. A missing link is the kernel's ENODEV error.
    fn get_link(&mut self, name: &str) -> Result<Vec<Link>, NetlinkError> {
        let replies = self.route.request(&link_get(name))?;
        let mut out = Vec::new();
        for r in replies.iter().filter(|r| r.msg_type == RTM_NEWLINK) {
            match parse_link(&r.payload) {
                Ok(l) => {
                    if let Some(n) = IfName::new(&l.name) {
                        self.index.insert(n, l.index);
                    }
                    out.push(l);
                }
                Err(e) => log::warn!("link {name}: cannot decode the reply: {e}"),
            }
        }
        Ok(out)
    }

    /// The ifindex of `name`, dumping the links again once if they changed since the last dump.
    fn resolve(
        &mut self,
        own: &Ownership,
        ops: &[Op],
        name: &str,
        queue: &mut Queue,
        failed: &mut Vec<(usize, KernelError)>,
    ) -> Result<Option<u32>, KernelError> {
        let Some(key) = IfName::new(name) else {
            // Longer than any link name: no link has it.
            return Ok(None);
        };
        if let Some(i) = self.index.get(&key) {
            return Ok(Some(*i));
        }
        if !self.index_stale {
            return Ok(None);
        }
        self.flush(own, ops, queue, failed);
        // One event adds a peer or two: asking for the few new links by name keeps that
        // O(changes); a large batch is cheaper with one dump (SPEC P-1, P-3).
        const BY_NAME_UP_TO: usize = 16;
        if self.created <= BY_NAME_UP_TO {
            match self.get_link(name) {
                Ok(_) => {
                    if let Some(i) = self.index.get(&key) {
                        return Ok(Some(*i));
                    }
                }
                Err(e) if e.errno() == libc::ENODEV => return Ok(None),
                // Anything else: fall back to the dump below.
                Err(e) => log::debug!("get link {name}: {e}; dumping links instead"),
            }
        }
        // Only the map is wanted: no list of links is kept.
        self.dump_links(0, |_| false)?;
        Ok(self.index.get(&key).copied())
    }

    fn fou_op(&mut self, op: &Op, p: &FouPort, add: bool) -> Result<(), KernelError> {
        let res = if add {
            self.genl.request(FOU_GENL_NAME, |id| fou_add(id, p))
        } else {
            self.genl.request(FOU_GENL_NAME, |id| fou_del(id, p))
        };
        let Err(e) = res else { return Ok(()) };
        let errno = e.errno();
        let settles = if add {
            matches!(errno, libc::EEXIST | libc::EALREADY | libc::EADDRINUSE)
        } else {
            matches!(errno, libc::EINVAL | libc::ENOENT)
        };
        if !settles {
            return Err(kerr(op.to_string(), &e));
        }
        let ports = self.fou_ports()?;
        let same = |q: &&FouPort| q.family == p.family && q.port == p.port;
        match (add, ports.iter().find(same)) {
            (true, Some(q)) if q.gue == p.gue => Ok(()),
            (true, Some(_)) => Err(clash(
                op,
                "the port is open with another encapsulation".into(),
            )),
            (false, None) => Ok(()),
            _ => Err(kerr(op.to_string(), &e)),
        }
    }
}

impl Kernel for NetlinkKernel {
    fn links_named(&mut self, names: &[&str]) -> Result<Vec<Link>, KernelError> {
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            match self.get_link(name) {
                Ok(links) => out.extend(links),
                Err(e) if e.errno() == libc::ENODEV => {
                    if let Some(n) = IfName::new(name) {
                        self.index.remove(&n);
                    }
                }
                Err(e) => return Err(kerr(format!("get link {name}"), &e)),
            }
        }
        Ok(out)
    }

    fn read(&mut self, own: &Ownership) -> Result<Actual, KernelError> {
        let links = self.links()?;
        let addrs = self.addrs()?;
        let routes = self.routes(own.protocol, &links)?;
        let rules = self.rules(own.protocol)?;
        let fou = self.fou_ports()?;
        Ok(Actual {
            links,
            addrs,
            routes,
            rules,
            fou,
        })
    }

    fn apply(&mut self, own: &Ownership, ops: &[Op]) -> Vec<(usize, KernelError)> {
        let mut failed = Vec::new();
        let mut queue = Queue::default();
        let not_sent = |from: usize, failed: &mut Vec<(usize, KernelError)>| {
            log::info!(
                "stopping: {} of {} operations not sent",
                ops.len() - from,
                ops.len()
            );
            failed.extend((from..ops.len()).map(|j| (j, KernelError::not_sent(&ops[j]))));
        };
        for (i, op) in ops.iter().enumerate() {
            let req = match op {
                Op::AddFouPort(p) | Op::DelFouPort(p) => {
                    // Another socket: keep the order by sending what is queued first.
                    self.flush(own, ops, &mut queue, &mut failed);
                    if self.halted() {
                        not_sent(i, &mut failed);
                        break;
                    }
                    match self.fou_op(op, p, matches!(op, Op::AddFouPort(_))) {
                        Ok(()) => log::info!("{op}"),
                        Err(e) => failed.push((i, e)),
                    }
                    continue;
                }
                Op::CreateTunnel(t) => {
                    self.index_stale = true;
                    self.created += 1;
                    link_create(t, own.link_group)
                }
                Op::ChangeTunnel { index, want } => link_change(*index, want),
                Op::SetUp { index, .. } => link_set_up(*index),
                Op::DeleteTunnel { index, name } => {
                    if let Some(n) = IfName::new(name) {
                        self.index.remove(&n);
                    }
                    link_delete(*index)
                }
                Op::ReplaceRoute(r) | Op::DeleteRoute(r) => {
                    let oif = match &r.nexthop {
                        NextHop::Dev(name) => {
                            match self.resolve(own, ops, name, &mut queue, &mut failed) {
                                Ok(oif) => oif,
                                Err(e) => {
                                    failed.push((
                                        i,
                                        KernelError {
                                            op: op.to_string(),
                                            ..e
                                        },
                                    ));
                                    continue;
                                }
                            }
                        }
                        NextHop::Via(_) => None,
                    };
                    match (op, oif, &r.nexthop) {
                        (Op::ReplaceRoute(_), None, NextHop::Dev(name)) => {
                            failed.push((
                                i,
                                KernelError {
                                    op: op.to_string(),
                                    errno: libc::ENODEV,
                                    msg: format!("no link named {name}"),
                                },
                            ));
                            continue;
                        }
                        (Op::ReplaceRoute(_), ..) => route_replace(r, oif),
                        // Without the device (gone or unknown) the delete matches destination,
                        // table, type and our protocol only.
                        _ => route_delete(r, oif),
                    }
                }
                Op::AddRule(r) => rule_add(r),
                Op::DeleteRule(r) => rule_delete(r),
            };
            // Queued after the op's own bookkeeping above (a create marks the map stale), so a
            // flush here, whose error handling may dump the links, sees this request sent.
            queue.push(i, req);
            if queue.full() {
                self.flush(own, ops, &mut queue, &mut failed);
                // Between two batches: the only place a stop can cut a pass (SPEC S-5).
                if self.halted() && i + 1 < ops.len() {
                    not_sent(i + 1, &mut failed);
                    break;
                }
            }
        }
        self.flush(own, ops, &mut queue, &mut failed);
        failed.sort_by_key(|(i, _)| *i);
        failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(len: usize) -> Request {
        Request {
            msg_type: RTM_NEWLINK,
            flags: 0,
            payload: vec![0; len],
        }
    }

    #[test]
    fn ifname_inline() {
        let n = IfName::new("kt0a000002").unwrap();
        assert_eq!(n.as_str(), "kt0a000002");
        assert_eq!(format!("{n:?}"), "\"kt0a000002\"");
        assert_eq!(IfName::new("123456789012345").unwrap().as_str().len(), 15);
        assert_eq!(IfName::new("1234567890123456"), None);
        assert_eq!(IfName::new("").unwrap().as_str(), "");
        assert_ne!(IfName::new("a"), IfName::new("a\0"));
    }

    /// A queue is full at one batch's worth of messages or bytes, whichever comes first, and
    /// `batch` takes it as it is (no copy of the requests).
    #[test]
    fn queue_full_at_one_batch() {
        let mut q = Queue::default();
        for i in 0..BATCH_MESSAGES {
            assert!(!q.full(), "{i}");
            q.push(i, req(100));
        }
        assert!(q.full());
        assert_eq!(q.bytes, BATCH_MESSAGES * 116);
        assert_eq!(
            super::super::socket::chunks(&q.pending, BATCH_BYTES, BATCH_MESSAGES).len(),
            1
        );
        let mut q = Queue::default();
        q.push(0, req(BATCH_BYTES / 2));
        assert!(!q.full());
        q.push(1, req(BATCH_BYTES / 2));
        assert!(q.full());
    }
}
