//! Validated configuration, built from [`crate::cli::Args`].
//!
//! Core module: pure. Every bad value is reported as one line naming the flag (or environment
//! variable) and the value, and the process exits with code 2 (SPEC O-1, T-1).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use crate::cli::{Args, Command};
use crate::model::Ownership;

/// `--overlay-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverlayType {
    /// Tunnel only to peers outside every local subnet.
    Subnet,
    /// Tunnel to every peer.
    Full,
}

/// `--overlay-encap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncapMode {
    /// Plain IPIP / ip6ip6.
    Ipip,
    /// GUE (FOU) to `--overlay-encap-port`.
    Fou,
}

/// Everything the overlay planner needs, independent of Kubernetes and the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    /// `--enable-overlay`.
    pub enabled: bool,
    /// `--overlay-type`.
    pub kind: OverlayType,
    /// `--overlay-encap`.
    pub encap: EncapMode,
    /// `--overlay-encap-port`.
    pub port: u16,
    /// `--overlay-encap-rx-ports`.
    pub extra_rx_ports: Vec<u16>,
    /// `--enable-ipv4`.
    pub ipv4: bool,
    /// `--enable-ipv6`.
    pub ipv6: bool,
    /// `--tunnel-ttl`.
    pub ttl: u8,
    /// `--tunnel-mtu` (0 = automatic).
    pub mtu: u32,
    /// `--overlay-table`.
    pub table: u32,
    /// `--overlay-rule-priority`.
    pub rule_priority: u32,
    /// `--link-prefix`, `--link-group`, `--route-protocol`.
    pub own: Ownership,
}

/// DSR settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dsr {
    /// `--enable-dsr`.
    pub enabled: bool,
    /// `--service-external-ip-range`.
    pub external_ip_ranges: Vec<IpNet>,
    /// `--loadbalancer-ip-range`.
    pub lb_ip_ranges: Vec<IpNet>,
    /// `--dsr-table`.
    pub table: u32,
    /// `--dsr-rule-priority`.
    pub rule_priority: u32,
    /// `--dsr-endpointslice-managers`: trusted besides the EndpointSlice controller.
    pub slice_managers: Vec<String>,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Subcommand.
    pub command: Command,
    /// `--kubeconfig`.
    pub kubeconfig: Option<PathBuf>,
    /// `--master`.
    pub master: Option<String>,
    /// `--token-file`.
    pub token_file: Option<PathBuf>,
    /// `--ca-file`.
    pub ca_file: Option<PathBuf>,
    /// `--hostname-override`.
    pub hostname_override: Option<String>,
    /// Overlay settings.
    pub overlay: Overlay,
    /// DSR settings.
    pub dsr: Dsr,
    /// `--resync-period`.
    pub resync: Duration,
    /// `--state-dir`.
    pub state_dir: PathBuf,
    /// `--metrics-addr`.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// `--health-addr` (SPEC S-8).
    pub health_addr: Option<std::net::SocketAddr>,
    /// `--metrics-file`.
    pub metrics_file: Option<PathBuf>,
    /// `--dry-run`.
    pub dry_run: bool,
    /// `--once`.
    pub once: bool,
    /// `--adopt-kube-router` (SPEC B-7).
    pub adopt_kube_router: bool,
    /// `--log-level`.
    pub log_level: Option<log::LevelFilter>,
    /// BGP settings (SPEC B-1).
    pub bgp: crate::bgp::Settings,
}

/// A configuration error: names the flag or variable and the bad value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// `--flag` or `KR_TUNNELD_FLAG`.
    pub source: String,
    /// The value given.
    pub value: String,
    /// What is wrong.
    pub why: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid value '{}' for {}: {}",
            self.value, self.source, self.why
        )
    }
}

impl std::error::Error for ConfigError {}

/// Parse a Go-style duration: `300ms`, `30s`, `5m`, `1h`, `1m30s`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    if let Ok(n) = s.parse::<u64>() {
        return Some(Duration::from_secs(n));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let d = match &rest[..unit] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.checked_mul(60)?),
            "h" => Duration::from_secs(n.checked_mul(3600)?),
            _ => return None,
        };
        total = total.checked_add(d)?;
        rest = &rest[unit..];
    }
    Some(total)
}

pub(crate) fn parse_bool(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

struct V<'a> {
    args: &'a Args,
}

impl V<'_> {
    fn bad(&self, name: &str, why: impl Into<String>) -> ConfigError {
        let (value, source) = self.args.get(name);
        ConfigError {
            source: source.to_string(),
            value: value.to_string(),
            why: why.into(),
        }
    }

    fn opt(&self, name: &str) -> Option<String> {
        let (v, _) = self.args.get(name);
        (!v.is_empty()).then(|| v.to_string())
    }

    fn bool(&self, name: &str) -> Result<bool, ConfigError> {
        parse_bool(self.args.get(name).0).ok_or_else(|| self.bad(name, "expected true or false"))
    }

    fn num<T: std::str::FromStr + PartialOrd + fmt::Display + Copy>(
        &self,
        name: &str,
        min: T,
        max: T,
    ) -> Result<T, ConfigError> {
        let v = self.args.get(name).0;
        match v.parse::<T>() {
            Ok(n) if n >= min && n <= max => Ok(n),
            _ => Err(self.bad(name, format!("expected a number from {min} to {max}"))),
        }
    }

    fn nets(&self, name: &str) -> Result<Vec<IpNet>, ConfigError> {
        let v = self.args.get(name).0;
        let mut out = Vec::new();
        for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let net: IpNet = part
                .parse()
                .map_err(|_| self.bad(name, format!("'{part}' is not a CIDR")))?;
            out.push(net.trunc());
        }
        Ok(out)
    }
}

impl V<'_> {
    /// A comma list of Kubernetes label values (1–63 of `[A-Za-z0-9._-]`, alphanumeric at
    /// both ends).
    fn label_values(&self, name: &str) -> Result<Vec<String>, ConfigError> {
        let mut out = Vec::new();
        for part in self.args.get(name).0.split(',').map(str::trim) {
            let b = part.as_bytes();
            let edge = |c: Option<&u8>| c.is_some_and(u8::is_ascii_alphanumeric);
            if part.len() > 63
                || !edge(b.first())
                || !edge(b.last())
                || !b
                    .iter()
                    .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(c))
            {
                if part.is_empty() {
                    continue;
                }
                return Err(self.bad(name, format!("'{part}' is not a label value")));
            }
            out.push(part.to_string());
        }
        Ok(out)
    }
}

impl Config {
    /// Validate everything the user typed.
    pub fn from_args(args: &Args) -> Result<Config, ConfigError> {
        let v = V { args };
        let kind = match v.args.get("overlay-type").0 {
            "subnet" => OverlayType::Subnet,
            "full" => OverlayType::Full,
            _ => return Err(v.bad("overlay-type", "expected subnet or full")),
        };
        let encap = match v.args.get("overlay-encap").0 {
            "ipip" => EncapMode::Ipip,
            "fou" => EncapMode::Fou,
            _ => return Err(v.bad("overlay-encap", "expected ipip or fou")),
        };
        let port = v.num::<u16>("overlay-encap-port", 1024, 65535)?;
        let mut extra_rx_ports = Vec::new();
        for p in v
            .args
            .get("overlay-encap-rx-ports")
            .0
            .split(',')
            .map(str::trim)
        {
            if p.is_empty() {
                continue;
            }
            match p.parse::<u16>() {
                Ok(n) if n >= 1024 => extra_rx_ports.push(n),
                _ => {
                    return Err(v.bad(
                        "overlay-encap-rx-ports",
                        format!("'{p}' is not a port from 1024 to 65535"),
                    ))
                }
            }
        }
        let prefix = v.args.get("link-prefix").0.to_string();
        let prefix_ok = (1..=4).contains(&prefix.len())
            && prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !prefix_ok {
            return Err(v.bad("link-prefix", "expected 1 to 4 characters from [a-z0-9_-]"));
        }
        let protocol = v.num::<u8>("route-protocol", 1, 255)?;
        if protocol <= 4 || protocol == 17 {
            return Err(v.bad(
                "route-protocol",
                "0-4 belong to the kernel and 17 is kube-router's; choose another number",
            ));
        }
        let ipv4 = v.bool("enable-ipv4")?;
        let ipv6 = v.bool("enable-ipv6")?;
        if !ipv4 && !ipv6 {
            return Err(v.bad(
                "enable-ipv4",
                "at least one of --enable-ipv4 and --enable-ipv6 must be true",
            ));
        }
        let table = v.num::<u32>("overlay-table", 1, u32::MAX)?;
        if matches!(table, 253..=255) {
            return Err(v.bad(
                "overlay-table",
                "253-255 are the default, main and local tables",
            ));
        }
        let dsr_table = v.num::<u32>("dsr-table", 1, u32::MAX)?;
        if matches!(dsr_table, 253..=255) || dsr_table == table {
            return Err(v.bad(
                "dsr-table",
                "must differ from --overlay-table and from 253-255",
            ));
        }
        let overlay = Overlay {
            enabled: v.bool("enable-overlay")?,
            kind,
            encap,
            port,
            extra_rx_ports,
            ipv4,
            ipv6,
            ttl: v.num::<u8>("tunnel-ttl", 1, 255)?,
            mtu: {
                let m = v.num::<u32>("tunnel-mtu", 0, 65535)?;
                if m != 0 && m < 1280 && ipv6 {
                    return Err(v.bad("tunnel-mtu", "IPv6 needs at least 1280"));
                }
                if m != 0 && m < 576 {
                    return Err(v.bad("tunnel-mtu", "expected 0 (automatic) or at least 576"));
                }
                m
            },
            table,
            rule_priority: v.num::<u32>("overlay-rule-priority", 1, 32765)?,
            own: Ownership {
                name_prefix: prefix,
                link_group: v.num::<u32>("link-group", 1, u32::MAX)?,
                protocol,
            },
        };
        let dsr = Dsr {
            enabled: v.bool("enable-dsr")?,
            external_ip_ranges: v.nets("service-external-ip-range")?,
            lb_ip_ranges: v.nets("loadbalancer-ip-range")?,
            table: dsr_table,
            rule_priority: v.num::<u32>("dsr-rule-priority", 1, 32765)?,
            slice_managers: v.label_values("dsr-endpointslice-managers")?,
        };
        if dsr.rule_priority == overlay.rule_priority {
            return Err(v.bad(
                "dsr-rule-priority",
                "must differ from --overlay-rule-priority",
            ));
        }
        let resync = parse_duration(v.args.get("resync-period").0)
            .filter(|d| *d >= Duration::from_secs(1))
            .ok_or_else(|| {
                v.bad(
                    "resync-period",
                    "expected a duration of at least 1s, e.g. 30s, 5m, 1h",
                )
            })?;
        let metrics_addr = match v.opt("metrics-addr") {
            None => None,
            Some(s) => Some(s.parse().map_err(|_| {
                v.bad("metrics-addr", "expected ADDRESS:PORT, e.g. 127.0.0.1:9477")
            })?),
        };
        let health_addr = match v.opt("health-addr") {
            None => None,
            Some(s) => Some(s.parse().map_err(|_| {
                v.bad("health-addr", "expected ADDRESS:PORT, e.g. 127.0.0.1:20244")
            })?),
        };
        let log_level = match v.opt("log-level") {
            None => None,
            Some(s) => Some(s.parse::<log::LevelFilter>().map_err(|_| {
                v.bad(
                    "log-level",
                    "expected off, error, warn, info, debug or trace",
                )
            })?),
        };
        if let Some(m) = v.opt("master") {
            if !(m.starts_with("https://") || m.starts_with("http://")) {
                return Err(v.bad("master", "expected an http:// or https:// URL"));
            }
        }
        Ok(Config {
            command: args.command,
            kubeconfig: v.opt("kubeconfig").map(PathBuf::from),
            master: v.opt("master"),
            token_file: v.opt("token-file").map(PathBuf::from),
            ca_file: v.opt("ca-file").map(PathBuf::from),
            hostname_override: v.opt("hostname-override"),
            overlay,
            dsr,
            resync,
            state_dir: PathBuf::from(v.args.get("state-dir").0),
            metrics_addr,
            health_addr,
            metrics_file: v.opt("metrics-file").map(PathBuf::from),
            dry_run: v.bool("dry-run")?,
            once: v.bool("once")?,
            adopt_kube_router: v.bool("adopt-kube-router")?,
            log_level,
            bgp: crate::bgp::Settings::from_args(args)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{parse, Parsed};

    fn cfg(a: &[&str]) -> Result<Config, ConfigError> {
        let Parsed::Args(args) = parse(a.iter().copied(), &|_| None).unwrap() else {
            panic!()
        };
        Config::from_args(&args)
    }

    #[test]
    fn defaults_are_kube_routers() {
        let c = cfg(&[]).unwrap();
        assert!(c.overlay.enabled);
        assert_eq!(c.overlay.kind, OverlayType::Subnet);
        assert_eq!(c.overlay.encap, EncapMode::Ipip);
        assert_eq!(c.overlay.port, 5555);
        assert_eq!(c.overlay.table, 77);
        assert_eq!(c.dsr.table, 78);
        assert_eq!(c.resync, Duration::from_secs(300));
        assert!(c.overlay.ipv4 && !c.overlay.ipv6);
    }

    #[test]
    fn bad_values_name_the_flag_and_value() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["--overlay-type", "mesh"],
                "invalid value 'mesh' for --overlay-type: expected subnet or full",
            ),
            (
                &["--overlay-encap", "gre"],
                "invalid value 'gre' for --overlay-encap: expected ipip or fou",
            ),
            (
                &["--overlay-encap-port", "80"],
                "invalid value '80' for --overlay-encap-port",
            ),
            (
                &["--overlay-encap-port", "70000"],
                "invalid value '70000' for --overlay-encap-port",
            ),
            (
                &["--enable-overlay=maybe"],
                "invalid value 'maybe' for --enable-overlay",
            ),
            (
                &["--route-protocol", "17"],
                "invalid value '17' for --route-protocol",
            ),
            (
                &["--link-prefix", "tunnel"],
                "invalid value 'tunnel' for --link-prefix",
            ),
            (
                &["--resync-period", "5x"],
                "invalid value '5x' for --resync-period",
            ),
            (&["--tunnel-ttl", "0"], "invalid value '0' for --tunnel-ttl"),
            (
                &["--service-external-ip-range", "10.0.0.0/33"],
                "'10.0.0.0/33' is not a CIDR",
            ),
            (&["--dsr-table", "77"], "invalid value '77' for --dsr-table"),
            (
                &["--dsr-endpointslice-managers", "ok.io,bad/x"],
                "invalid value 'ok.io,bad/x' for --dsr-endpointslice-managers: 'bad/x' is not a label value",
            ),
            (
                &["--master", "10.0.0.1:6443"],
                "invalid value '10.0.0.1:6443' for --master",
            ),
            (
                &["--log-level", "loud"],
                "invalid value 'loud' for --log-level",
            ),
        ];
        for (a, want) in cases {
            let e = cfg(a).unwrap_err().to_string();
            assert!(e.contains(want), "{a:?}: {e}");
        }
    }

    #[test]
    fn errors_from_variables_name_the_variable() {
        let env = |k: &str| (k == "KR_TUNNELD_OVERLAY_ENCAP").then(|| "vxlan".to_string());
        let Parsed::Args(args) = parse(Vec::<&str>::new(), &env).unwrap() else {
            panic!()
        };
        let e = Config::from_args(&args).unwrap_err().to_string();
        assert_eq!(
            e,
            "invalid value 'vxlan' for KR_TUNNELD_OVERLAY_ENCAP: expected ipip or fou"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        for bad in ["", "m", "1d", "s5", "-1s", "5m5"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn every_flag_default_validates() {
        // The defaults in the flag table must themselves be valid (a typo there would make the
        // daemon refuse to start with no flags at all).
        assert!(cfg(&[]).is_ok());
    }
}
