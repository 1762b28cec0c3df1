//! Command line and environment: lexopt → [`Args`] (what the user typed), then
//! [`crate::config::Config::from_args`] validates it.
//!
//! Core module: pure. The environment is passed in as a lookup function, so flag tests are tests over
//! string arrays. Every flag `--foo-bar` also reads `KR_TUNNELD_FOO_BAR` (SPEC O-1); a flag given on
//! the command line wins over its variable. Flags keep kube-router's names where they exist.

use std::ffi::OsString;
use std::fmt;

/// How a flag takes its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `--flag`, `--flag=true|false` (Go pflag style; a bare flag means true).
    Bool,
    /// `--flag VALUE` or `--flag=VALUE`.
    Value,
    /// Like `Value`, repeatable; the variable holds a comma-separated list.
    List,
}

/// One flag: its name, group, default and help. The table [`FLAGS`] drives parsing, `--help`, the
/// environment variable names and the env file shipped in packaging/.
#[derive(Debug)]
pub struct Flag {
    /// Long name without dashes.
    pub name: &'static str,
    /// How it takes a value.
    pub kind: Kind,
    /// Placeholder in `--help`.
    pub value: &'static str,
    /// Default, as text ("" = unset).
    pub default: &'static str,
    /// Help group.
    pub group: &'static str,
    /// One-line help.
    pub help: &'static str,
}

macro_rules! flag {
    ($name:literal, $kind:ident, $value:literal, $default:literal, $group:literal, $help:literal) => {
        Flag {
            name: $name,
            kind: Kind::$kind,
            value: $value,
            default: $default,
            group: $group,
            help: $help,
        }
    };
}

/// Every flag kr-tunneld knows, in `--help` order.
pub const FLAGS: &[Flag] = &[
    flag!(
        "kubeconfig",
        Value,
        "PATH",
        "",
        "Kubernetes",
        "kubeconfig file (current-context is used)"
    ),
    flag!(
        "master",
        Value,
        "URL",
        "",
        "Kubernetes",
        "API server URL; overrides the kubeconfig's server"
    ),
    flag!(
        "token-file",
        Value,
        "PATH",
        "",
        "Kubernetes",
        "bearer token file, re-read when it changes"
    ),
    flag!(
        "ca-file",
        Value,
        "PATH",
        "",
        "Kubernetes",
        "CA bundle that signs the API server certificate"
    ),
    flag!(
        "hostname-override",
        Value,
        "NAME",
        "",
        "Kubernetes",
        "this node's name (else NODE_NAME, else the host name)"
    ),
    flag!(
        "enable-overlay",
        Bool,
        "BOOL",
        "true",
        "Overlay",
        "tunnel pod traffic to peers (else direct routes in the local subnet only)"
    ),
    flag!(
        "overlay-type",
        Value,
        "subnet|full",
        "subnet",
        "Overlay",
        "subnet: tunnel only to peers outside the local subnets; full: tunnel to all peers"
    ),
    flag!(
        "overlay-encap",
        Value,
        "ipip|fou",
        "ipip",
        "Overlay",
        "transmit encapsulation; fou = GUE over UDP (every node always receives both)"
    ),
    flag!(
        "overlay-encap-port",
        Value,
        "PORT",
        "5555",
        "Overlay",
        "GUE destination port and FOU receive port (1024-65535)"
    ),
    flag!(
        "overlay-encap-rx-ports",
        List,
        "PORT,..",
        "",
        "Overlay",
        "extra FOU receive ports, for a zero-drop change of --overlay-encap-port"
    ),
    flag!(
        "enable-ipv4",
        Bool,
        "BOOL",
        "true",
        "Overlay",
        "manage IPv4 tunnels and routes"
    ),
    flag!(
        "enable-ipv6",
        Bool,
        "BOOL",
        "false",
        "Overlay",
        "manage IPv6 tunnels and routes"
    ),
    flag!(
        "tunnel-ttl",
        Value,
        "1-255",
        "64",
        "Overlay",
        "outer TTL / hop limit of tunnel packets"
    ),
    flag!(
        "tunnel-mtu",
        Value,
        "MTU",
        "0",
        "Overlay",
        "tunnel MTU; 0 = underlay device MTU minus encapsulation overhead"
    ),
    flag!(
        "link-prefix",
        Value,
        "PREFIX",
        "kt",
        "Overlay",
        "name prefix of tunnel links (1-4 characters, [a-z0-9_-])"
    ),
    flag!(
        "link-group",
        Value,
        "N",
        "19284",
        "Overlay",
        "link group (IFLA_GROUP) marking our tunnels, 1-4294967295"
    ),
    flag!(
        "route-protocol",
        Value,
        "N",
        "157",
        "Overlay",
        "route/rule protocol number marking our routes and rules (1-255, not 17)"
    ),
    flag!(
        "overlay-table",
        Value,
        "N",
        "77",
        "Overlay",
        "table holding peer-IP routes through tunnels"
    ),
    flag!(
        "overlay-rule-priority",
        Value,
        "N",
        "32001",
        "Overlay",
        "priority of the 'from <pod CIDR> lookup <table>' rules"
    ),
    flag!(
        "resync-period",
        Value,
        "DURATION",
        "5m",
        "Overlay",
        "full reconcile interval (e.g. 30s, 5m, 1h)"
    ),
    flag!(
        "state-dir",
        Value,
        "PATH",
        "/run/kr-tunneld",
        "Overlay",
        "runtime state (FOU ports opened, last status)"
    ),
    flag!(
        "enable-dsr",
        Bool,
        "BOOL",
        "false",
        "DSR",
        "program IPVS tunnel-mode DSR for annotated Services"
    ),
    flag!(
        "service-external-ip-range",
        List,
        "CIDR,..",
        "",
        "DSR",
        "accepted Service externalIPs (repeatable)"
    ),
    flag!(
        "loadbalancer-ip-range",
        List,
        "CIDR,..",
        "",
        "DSR",
        "accepted LoadBalancer ingress IPs (repeatable)"
    ),
    flag!(
        "dsr-table",
        Value,
        "N",
        "78",
        "DSR",
        "table with 'local default dev lo' for DSR VIPs"
    ),
    flag!(
        "dsr-rule-priority",
        Value,
        "N",
        "32000",
        "DSR",
        "priority of the 'to <VIP> ipproto P dport N' rules"
    ),
    flag!(
        "dsr-endpointslice-managers",
        List,
        "NAME,..",
        "",
        "DSR",
        "EndpointSlice managed-by values trusted besides the controller's"
    ),
    flag!(
        "enable-ibgp",
        Bool,
        "BOOL",
        "false",
        "BGP",
        "join a kube-router cluster: iBGP sessions with the other nodes, announcing this node's pod CIDRs"
    ),
    flag!(
        "cluster-asn",
        Value,
        "ASN",
        "64512",
        "BGP",
        "the cluster's AS (64512-65535 or 4200000000-4294967294)"
    ),
    flag!("bgp-port", Value, "PORT", "179", "BGP", "BGP port, the same on every node"),
    flag!(
        "bgp-holdtime",
        Value,
        "DURATION",
        "90s",
        "BGP",
        "hold time offered (3s to 18h12m15s; keepalives at a third)"
    ),
    flag!(
        "bgp-graceful-restart",
        Bool,
        "BOOL",
        "false",
        "BGP",
        "graceful restart: peers keep our routes while kr-tunneld restarts"
    ),
    flag!(
        "bgp-graceful-restart-time",
        Value,
        "DURATION",
        "90s",
        "BGP",
        "how long peers keep our routes (at most 4095s)"
    ),
    flag!(
        "router-id",
        Value,
        "IPV4|generate",
        "",
        "BGP",
        "BGP identifier (default: the node's IPv4 address; required on IPv6-only nodes)"
    ),
    flag!(
        "nodes-full-mesh",
        Bool,
        "BOOL",
        "true",
        "BGP",
        "peer with every node (else only nodes with the same kube-router.io/node.asn)"
    ),
    flag!(
        "advertise-pod-cidr",
        Bool,
        "BOOL",
        "true",
        "BGP",
        "kube-router's flag, for external peers; iBGP peers always get the pod CIDRs"
    ),
    flag!(
        "metrics-addr",
        Value,
        "ADDR:PORT",
        "",
        "Service",
        "serve Prometheus metrics here (empty = off)"
    ),
    flag!(
        "health-addr",
        Value,
        "ADDR:PORT",
        "",
        "Service",
        "serve /healthz and /readyz here (empty = off; also on --metrics-addr)"
    ),
    flag!(
        "metrics-file",
        Value,
        "PATH",
        "",
        "Service",
        "also write metrics to this file (node_exporter textfile)"
    ),
    flag!(
        "dry-run",
        Bool,
        "BOOL",
        "false",
        "Service",
        "print the plan instead of applying it"
    ),
    flag!(
        "adopt-kube-router",
        Bool,
        "BOOL",
        "false",
        "Service",
        "on start, take over kube-router's tunnels, routes, rule and FOU port (see adopt)"
    ),
    flag!(
        "once",
        Bool,
        "BOOL",
        "false",
        "Service",
        "converge once and exit (non-zero if anything failed)"
    ),
    flag!(
        "log-level",
        Value,
        "LEVEL",
        "",
        "Logging",
        "error, warn, info, debug or trace (default info, or RUST_LOG)"
    ),
];

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Run the daemon (default).
    Run,
    /// Remove everything kr-tunneld owns, then exit.
    Cleanup,
    /// Print the peer table and exit.
    Status,
    /// Take over what kube-router left on this node (`adopt --from kube-router`), then exit.
    Adopt,
}

/// The parsed command line: the command and each flag's raw text value (`None` = not given
/// anywhere, the default applies). Validation happens in [`crate::config`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// Subcommand.
    pub command: Command,
    /// Raw values, indexed like [`FLAGS`]; lists are joined with commas.
    pub values: Vec<Option<String>>,
    /// Where each value came from (for error messages): flag or variable name.
    pub sources: Vec<String>,
}

impl Args {
    /// The raw value of a flag, or its default.
    pub fn get(&self, name: &str) -> (&str, &str) {
        // Names come from string literals in this crate; a wrong one is a programming error that
        // every test run would hit at once, not a runtime condition.
        let i = flag_index(name).unwrap_or_else(|| panic!("unknown flag {name} in code"));
        match &self.values[i] {
            Some(v) => (v.as_str(), self.sources[i].as_str()),
            None => (FLAGS[i].default, self.sources[i].as_str()),
        }
    }
}

/// Outcome of parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// `--help`: print [`help`] and exit 0.
    Help,
    /// `--version`: print [`version`] and exit 0.
    Version,
    /// Run with these arguments.
    Args(Args),
}

/// A usage error: one line, exit code 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError(pub String);

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CliError {}

/// `foo-bar` → `KR_TUNNELD_FOO_BAR`.
pub fn env_name(flag: &str) -> String {
    format!("KR_TUNNELD_{}", flag.to_ascii_uppercase().replace('-', "_"))
}

fn flag_index(name: &str) -> Option<usize> {
    FLAGS.iter().position(|f| f.name == name)
}

/// Parse the command line (without the program name) and the environment.
pub fn parse<I>(args: I, env: &dyn Fn(&str) -> Option<String>) -> Result<Parsed, CliError>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    use lexopt::prelude::*;

    let mut values: Vec<Option<String>> = vec![None; FLAGS.len()];
    let mut sources: Vec<String> = FLAGS.iter().map(|f| format!("--{}", f.name)).collect();
    for (i, f) in FLAGS.iter().enumerate() {
        let var = env_name(f.name);
        if let Some(v) = env(&var) {
            values[i] = Some(v);
            sources[i] = var;
        }
    }
    let mut from_cli = vec![false; FLAGS.len()];
    let mut command = None;
    let mut p = lexopt::Parser::from_args(args.into_iter().map(Into::into));
    let err = |e: lexopt::Error| CliError(e.to_string());
    while let Some(arg) = p.next().map_err(err)? {
        match arg {
            Short('h') | Long("help") => return Ok(Parsed::Help),
            Short('V') | Long("version") => return Ok(Parsed::Version),
            Long("from") if command == Some(Command::Adopt) => {
                let v = p.value().map_err(err)?.string().map_err(err)?;
                if v != "kube-router" {
                    return Err(CliError(format!(
                        "adopt --from {v}: only kube-router can be adopted"
                    )));
                }
            }
            Long(name) => {
                let name = name.to_string();
                let i = flag_index(&name)
                    .ok_or_else(|| CliError(format!("unknown option --{name}")))?;
                let v = match FLAGS[i].kind {
                    Kind::Bool => match p.optional_value() {
                        Some(v) => v.string().map_err(err)?,
                        None => "true".to_string(),
                    },
                    Kind::Value | Kind::List => p.value().map_err(err)?.string().map_err(err)?,
                };
                sources[i] = format!("--{name}");
                values[i] = match (FLAGS[i].kind, from_cli[i], values[i].take()) {
                    (Kind::List, true, Some(prev)) => Some(format!("{prev},{v}")),
                    _ => Some(v),
                };
                from_cli[i] = true;
            }
            Value(v) if command.is_none() => {
                let v = v.string().map_err(err)?;
                command = Some(match v.as_str() {
                    "run" => Command::Run,
                    "cleanup" => Command::Cleanup,
                    "status" => Command::Status,
                    "adopt" => Command::Adopt,
                    _ => {
                        return Err(CliError(format!(
                            "unknown command '{v}' (run, cleanup, status or adopt)"
                        )))
                    }
                });
            }
            other => return Err(err(other.unexpected())),
        }
    }
    Ok(Parsed::Args(Args {
        command: command.unwrap_or(Command::Run),
        values,
        sources,
    }))
}

/// The version line: crate version and the git commit it was built from.
pub fn version() -> String {
    format!(
        "kr-tunneld {} (commit {})",
        env!("CARGO_PKG_VERSION"),
        option_env!("KR_TUNNELD_COMMIT").unwrap_or("unknown")
    )
}

/// The `--help` text, generated from [`FLAGS`].
pub fn help() -> String {
    let mut s = String::from(
        "kr-tunneld: kube-router's overlay tunnels (IPIP/ip6tnl, GUE) and IPVS tunnel-mode DSR \
         for Kubernetes nodes\n\nUSAGE:\n    kr-tunneld [run|cleanup|status|adopt] [OPTIONS]\n\n\
         COMMANDS:\n    run        watch the API and reconcile the kernel (default)\n    \
         cleanup    remove every link, route, rule and FOU port kr-tunneld owns\n    \
         status     print the peer table from the kernel and the last reconcile\n    \
         adopt --from kube-router\n               \
         replace kube-router's tun-* tunnels, proto-17 and table-77 routes, lookup-77 rule\n               \
         and FOU port by kr-tunneld's own, without a gap, then exit (SPEC B-7)\n",
    );
    let mut group = "";
    for f in FLAGS {
        if f.group != group {
            group = f.group;
            s.push_str(&format!("\n{} OPTIONS:\n", group.to_uppercase()));
        }
        let head = match f.kind {
            Kind::Bool => format!("--{}[=BOOL]", f.name),
            _ => format!("--{} <{}>", f.name, f.value),
        };
        s.push_str(&format!("    {head}\n        {}\n        ", f.help));
        if !f.default.is_empty() {
            s.push_str(&format!("[default: {}] ", f.default));
        }
        s.push_str(&format!("[env: {}]\n", env_name(f.name)));
    }
    s.push_str("\n    -h, --help       print this help\n    -V, --version    print the version\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn args(a: &[&str]) -> Args {
        match parse(a.iter().copied(), &no_env).unwrap() {
            Parsed::Args(a) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn defaults_apply_when_nothing_given() {
        let a = args(&[]);
        assert_eq!(a.command, Command::Run);
        assert_eq!(a.get("overlay-encap"), ("ipip", "--overlay-encap"));
        assert_eq!(a.get("overlay-encap-port").0, "5555");
    }

    #[test]
    fn flag_forms() {
        let a = args(&[
            "--overlay-encap",
            "fou",
            "--overlay-type=full",
            "--enable-overlay=false",
        ]);
        assert_eq!(a.get("overlay-encap").0, "fou");
        assert_eq!(a.get("overlay-type").0, "full");
        assert_eq!(a.get("enable-overlay").0, "false");
        assert_eq!(args(&["--dry-run"]).get("dry-run").0, "true");
    }

    #[test]
    fn every_flag_reads_its_variable_and_the_flag_wins() {
        for f in FLAGS {
            let var = env_name(f.name);
            let env = |k: &str| (k == var).then(|| "from-env".to_string());
            let Parsed::Args(a) = parse(Vec::<&str>::new(), &env).unwrap() else {
                panic!()
            };
            assert_eq!(a.get(f.name), ("from-env", var.as_str()), "{}", f.name);
            let cli = match f.kind {
                Kind::Bool => vec![format!("--{}=from-cli", f.name)],
                _ => vec![format!("--{}", f.name), "from-cli".to_string()],
            };
            let Parsed::Args(a) = parse(cli, &env).unwrap() else {
                panic!()
            };
            assert_eq!(a.get(f.name).0, "from-cli", "{}", f.name);
        }
    }

    #[test]
    fn lists_repeat_and_join() {
        let a = args(&[
            "--service-external-ip-range",
            "10.0.0.0/8",
            "--service-external-ip-range=fd00::/8",
        ]);
        assert_eq!(a.get("service-external-ip-range").0, "10.0.0.0/8,fd00::/8");
    }

    #[test]
    fn commands_help_version_and_errors() {
        assert_eq!(args(&["cleanup"]).command, Command::Cleanup);
        assert_eq!(
            args(&["status", "--kubeconfig", "k"]).command,
            Command::Status
        );
        assert_eq!(
            args(&["adopt", "--from", "kube-router"]).command,
            Command::Adopt
        );
        assert_eq!(args(&["adopt"]).command, Command::Adopt);
        assert!(parse(["adopt", "--from", "calico"], &no_env).is_err());
        assert!(parse(["--from", "kube-router"], &no_env).is_err());
        assert_eq!(parse(["--help"], &no_env), Ok(Parsed::Help));
        assert_eq!(parse(["-V"], &no_env), Ok(Parsed::Version));
        let e = parse(["--overlay-encapp", "fou"], &no_env).unwrap_err();
        assert_eq!(e.0, "unknown option --overlay-encapp");
        assert!(parse(["frobnicate"], &no_env)
            .unwrap_err()
            .0
            .contains("frobnicate"));
        assert!(parse(["--overlay-encap"], &no_env).is_err());
    }

    #[test]
    fn help_lists_every_flag_with_default_and_variable() {
        let h = help();
        for f in FLAGS {
            assert!(h.contains(&format!("--{}", f.name)), "{}", f.name);
            assert!(h.contains(&env_name(f.name)), "{}", f.name);
        }
        assert!(h.contains("[default: 5555]"));
    }
}
