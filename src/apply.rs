//! The seam between the pure planner and the kernel: the [`Kernel`] trait, its netlink
//! implementation ([`crate::netlink::rtnl::NetlinkKernel`]) and an in-memory [`FakeKernel`] for
//! tests.
//!
//! Shell module: executes what it is told and reports; it decides nothing.

use std::fmt;

use crate::model::{Actual, Link, LinkKind, Op, Ownership};

/// An error from one kernel operation: what was done, to what, and the errno with the kernel's
/// extended-ack text when there was one (SPEC R-2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelError {
    /// The operation and object, e.g. `create tunnel kt0a000005`.
    pub op: String,
    /// Positive errno (0 when the failure was not an errno, e.g. a malformed reply).
    pub errno: i32,
    /// Extended ack message, or a description for non-errno failures.
    pub msg: String,
}

/// The message of an op left unsent because the daemon is stopping (see [`KernelError::not_sent`]).
const NOT_SENT: &str = "not sent: stopping";

impl KernelError {
    /// `op` was not sent: SIGTERM came in the middle of the pass (SPEC S-5). Not a failure of
    /// the op; what was applied before stays, and the next start converges.
    pub fn not_sent(op: &Op) -> KernelError {
        KernelError {
            op: op.to_string(),
            errno: 0,
            msg: NOT_SENT.into(),
        }
    }

    /// True for [`KernelError::not_sent`].
    pub fn is_not_sent(&self) -> bool {
        self.errno == 0 && self.msg == NOT_SENT
    }

    /// Transient failures are worth retrying soon; the rest wait for the next resync.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.errno,
            libc::ENOBUFS | libc::EBUSY | libc::EAGAIN | libc::EINTR
        )
    }
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.op)?;
        if self.errno != 0 {
            // io::Error's text already ends in "(os error N)".
            write!(f, "{}", std::io::Error::from_raw_os_error(self.errno))?;
            if !self.msg.is_empty() {
                write!(f, ": {}", self.msg)?;
            }
            Ok(())
        } else {
            f.write_str(&self.msg)
        }
    }
}

impl std::error::Error for KernelError {}

/// What the daemon needs from a kernel.
pub trait Kernel {
    /// Read the state the planner looks at: one dump per object type (SPEC P-2).
    fn read(&mut self, own: &Ownership) -> Result<Actual, KernelError>;

    /// Apply `ops` in order. Independent failures do not stop the rest; the result lists the
    /// index and error of every op that failed. Implementations may batch several requests per
    /// send (SPEC P-1) as long as the order is kept. An implementation told to stop may leave the
    /// rest of `ops` unsent between two batches: each of those is listed with
    /// [`KernelError::not_sent`] (SPEC S-5).
    fn apply(&mut self, own: &Ownership, ops: &[Op]) -> Vec<(usize, KernelError)>;

    /// The links of these names that exist (one lookup each, no dump): how the incremental path
    /// learns what it just created or changed (SPEC P-3).
    fn links_named(&mut self, names: &[&str]) -> Result<Vec<Link>, KernelError>;
}

/// An in-memory kernel: applies ops to an [`Actual`] and records them. Used by unit and scenario
/// tests to prove that plan → apply → plan converges to nothing.
#[derive(Debug, Default)]
pub struct FakeKernel {
    /// The state the fake kernel holds.
    pub state: Actual,
    /// Every op applied, in order.
    pub log: Vec<Op>,
    /// Next ifindex to hand out.
    pub next_index: u32,
    /// Ops (by `Display` text prefix) that fail with EPERM, to test error paths.
    pub fail_prefix: Option<String>,
}

impl FakeKernel {
    /// A fake kernel that already holds `state`.
    pub fn with(state: Actual) -> FakeKernel {
        let next = state.links.iter().map(|l| l.index).max().unwrap_or(0) + 1;
        FakeKernel {
            state,
            next_index: next.max(100),
            ..FakeKernel::default()
        }
    }

    fn apply_one(&mut self, own: &Ownership, op: &Op) -> Result<(), KernelError> {
        let err = |errno: i32| KernelError {
            op: op.to_string(),
            errno,
            msg: String::new(),
        };
        if let Some(p) = &self.fail_prefix {
            if op.to_string().starts_with(p.as_str()) {
                return Err(err(libc::EPERM));
            }
        }
        let s = &mut self.state;
        match op {
            Op::AddFouPort(p) => {
                if s.fou
                    .iter()
                    .any(|q| q.family == p.family && q.port == p.port)
                {
                    return Err(err(libc::EEXIST));
                }
                s.fou.push(*p);
            }
            Op::DelFouPort(p) => {
                let before = s.fou.len();
                s.fou
                    .retain(|q| !(q.family == p.family && q.port == p.port));
                if s.fou.len() == before {
                    return Err(err(libc::ENOENT));
                }
            }
            Op::CreateTunnel(t) => {
                if s.links.iter().any(|l| l.name == t.name) {
                    return Err(err(libc::EEXIST));
                }
                let index = self.next_index.max(1);
                self.next_index = index + 1;
                s.links.push(Link {
                    index,
                    name: t.name.clone(),
                    kind: LinkKind::for_family(t.family),
                    group: own.link_group,
                    mtu: t.mtu,
                    up: true,
                    tunnel: Some(t.clone()),
                });
            }
            Op::ChangeTunnel { index, want } => {
                let l = s
                    .links
                    .iter_mut()
                    .find(|l| l.index == *index)
                    .ok_or_else(|| err(libc::ENODEV))?;
                l.mtu = want.mtu;
                l.tunnel = Some(want.clone());
            }
            Op::SetUp { index, .. } => {
                let l = s
                    .links
                    .iter_mut()
                    .find(|l| l.index == *index)
                    .ok_or_else(|| err(libc::ENODEV))?;
                l.up = true;
            }
            Op::DeleteTunnel { index, .. } => {
                let before = s.links.len();
                s.links.retain(|l| l.index != *index);
                if s.links.len() == before {
                    return Err(err(libc::ENODEV));
                }
                // Routes through a deleted device go with it, as in the kernel.
                let names: Vec<String> = s.links.iter().map(|l| l.name.clone()).collect();
                s.routes.retain(|r| match &r.nexthop {
                    crate::model::NextHop::Dev(d) => names.contains(d),
                    crate::model::NextHop::Via(_) => true,
                });
            }
            Op::ReplaceRoute(r) => {
                s.routes.retain(|x| !(x.table == r.table && x.dst == r.dst));
                s.routes.push(r.clone());
            }
            Op::DeleteRoute(r) => {
                let before = s.routes.len();
                s.routes.retain(|x| !(x.table == r.table && x.dst == r.dst));
                if s.routes.len() == before {
                    return Err(err(libc::ESRCH));
                }
            }
            Op::AddRule(r) => {
                if s.rules.contains(r) {
                    return Err(err(libc::EEXIST));
                }
                s.rules.push(r.clone());
            }
            Op::DeleteRule(r) => {
                // The kernel deletes the first matching rule only.
                let i = s
                    .rules
                    .iter()
                    .position(|x| x == r)
                    .ok_or_else(|| err(libc::ENOENT))?;
                s.rules.remove(i);
            }
        }
        Ok(())
    }
}

impl Kernel for FakeKernel {
    fn read(&mut self, own: &Ownership) -> Result<Actual, KernelError> {
        let mut a = self.state.clone();
        a.routes.retain(|r| r.protocol == own.protocol);
        a.rules.retain(|r| r.protocol == own.protocol);
        Ok(a)
    }

    fn apply(&mut self, own: &Ownership, ops: &[Op]) -> Vec<(usize, KernelError)> {
        let mut failed = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            self.log.push(op.clone());
            if let Err(e) = self.apply_one(own, op) {
                failed.push((i, e));
            }
        }
        failed
    }

    fn links_named(&mut self, names: &[&str]) -> Result<Vec<Link>, KernelError> {
        Ok(self
            .state
            .links
            .iter()
            .filter(|l| names.contains(&l.name.as_str()))
            .cloned()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::KernelError;

    /// SPEC R-2, issue 12: the errno appears once ("(os error 2)" was printed twice).
    #[test]
    fn kernel_error_names_the_errno_once() {
        let e = KernelError {
            op: "add fou port ipv4 5555".into(),
            errno: libc::ENOENT,
            msg: "generic netlink family fou not found".into(),
        };
        assert_eq!(
            e.to_string(),
            "add fou port ipv4 5555: No such file or directory (os error 2): \
             generic netlink family fou not found"
        );
    }
}
