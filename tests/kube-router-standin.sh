#!/usr/bin/env bash
# kube-router-standin.sh - a kube-router node for the BGP tests, made of Debian's gobgpd (GoBGP 3.10)
# configured as kube-router configures its embedded GoBGP for internal peers, plus an injector that
# installs what kube-router installs for learned paths.  Facts and sources:
# ../shared/reference/kube-router-bgp.md (§2-§7) and kube-router-behaviour.md (§2).
#
# Run inside the node's network namespace (`ip netns exec NS bash kube-router-standin.sh ...`).
#
#   start DIR     write DIR/gobgpd.toml, start gobgpd, announce the own pod CIDRs (ORIGIN IGP,
#                 next hop = best IP of the family), add `from <pod CIDR> lookup 77` (no priority),
#                 start the injector.  PIDs in DIR/gobgpd.pid, DIR/injector.pid; logs in DIR.
#   stop DIR      stop like kube-router with graceful restart: SIGKILL gobgpd (TCP closes without a
#                 NOTIFICATION) and the injector; the kernel state stays.
#   cease DIR     stop like kube-router without graceful restart: SIGTERM gobgpd (a Cease to every
#                 peer), then stop the injector; the kernel state stays.
#   config        print the gobgpd configuration (TOML) for the environment below.
#   inject        the injector loop (what `start` runs in the background).
#
# Environment (the node):
#   KRS_IP4 / KRS_IP6   best IPv4 / IPv6 node address (the primary IP is KRS_IP4 if set)
#   KRS_PODS            own pod CIDRs, space separated
#   KRS_PEERS           the other nodes' primary IPs, space separated (full mesh)
#   KRS_ASN             cluster ASN (64512)
#   KRS_BGP_PORT        --bgp-port (179)
#   KRS_GR              graceful restart time in seconds; 0 = off (kube-router's flag default;
#                       every daemonset manifest turns it on with 90 s)
#   KRS_ENCAP           ipip | fou          (--overlay-encap)
#   KRS_ENCAP_PORT      5555                (--overlay-encap-port)
#   KRS_OVERLAY_TYPE    subnet | full       (--overlay-type)
#   KRS_SAME_SUBNET     delete-add (kube-router: delete the proto-17 routes and the tunnel, then add
#                       the `via` route, on every learned path) | replace (one `ip route replace`)
set -uo pipefail

ASN=${KRS_ASN:-64512}
PORT=${KRS_BGP_PORT:-179}
GR=${KRS_GR:-0}
IP4=${KRS_IP4:-}
IP6=${KRS_IP6:-}
PRIMARY=${IP4:-$IP6}
ENCAP=${KRS_ENCAP:-ipip}
EPORT=${KRS_ENCAP_PORT:-5555}
OTYPE=${KRS_OVERLAY_TYPE:-subnet}
SAME=${KRS_SAME_SUBNET:-delete-add}

log() { echo "$(date +%T.%N | cut -c1-12) $*"; }

config() {
  # §2: ASN, router-id = primary IP, listen on the node address(es) only, never the wildcard.
  local listen="\"$PRIMARY\""
  [[ -n $IP4 && -n $IP6 ]] && listen="\"$IP4\", \"$IP6\""
  cat <<EOF
[global.config]
  as = $ASN
  router-id = "${IP4:-$PRIMARY}"
  port = $PORT
  local-address-list = [$listen]
EOF
  local p
  for p in ${KRS_PEERS:-}; do
    # §4: peer AS left at 0 (decided from the OPEN), both sides connect, local address = own
    # primary IP, remote port = --bgp-port; GoBGP's default timers (hold 90, connect-retry 120).
    cat <<EOF

[[neighbors]]
  [neighbors.config]
    neighbor-address = "$p"
  [neighbors.transport.config]
    local-address = "$PRIMARY"
    remote-port = $PORT
EOF
    if ((GR > 0)); then
      # §5: restart time, deferral 360 s; LocalRestarting comes from gobgpd -r.
      cat <<EOF
  [neighbors.graceful-restart.config]
    enabled = true
    restart-time = $GR
    deferral-time = 360
EOF
    fi
    # §4: ipv4-unicast and ipv6-unicast (the stand-ins are dual-stack), MP-GR per AFI with GR.
    local afi
    for afi in ipv4-unicast ipv6-unicast; do
      cat <<EOF
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "$afi"
EOF
      if ((GR > 0)); then
        cat <<EOF
    [neighbors.afi-safis.mp-graceful-restart.config]
      enabled = true
EOF
      fi
    done
  done
}

# tun-<first 11 hex digits of sha256(next hop without . and :)> (behaviour §2.2).
tun_name() {
  local s=${1//./}
  s=${s//:/}
  echo "tun-$(printf %s "$s" | sha256sum | cut -c1-11)"
}

# same_subnet NH: the next hop lies in the prefix of one of the node's own IPs (behaviour §1.4).
same_subnet() {
  local nh=$1 own plen
  if [[ $nh == *:* ]]; then own=$IP6; else own=$IP4; fi
  [[ -n $own ]] || return 1
  plen=$(ip -o addr show | awk -v a="$own" '{ split($4, p, "/"); if (p[1] == a) { print p[2]; exit } }')
  [[ -n $plen ]] || return 1
  ip -o addr show to "$nh/$plen" | grep -qw -- "$own"
}

established() { # established PEER: its session is up (gobgp neighbor state 6)
  gobgp neighbor -j 2>/dev/null |
    jq -e --arg p "$1" 'type == "array" and
      any(.[]; .state.neighbor_address == $p and .state.session_state == 6)' \
      >/dev/null
}

# add CIDR NH: kube-router's injectRoute (nrc.go:675-743, bgp.md §7).
add() {
  local cidr=$1 nh=$2 v="" own=$IP4 name kind mode
  [[ $nh == *:* ]] && { v=-6; own=$IP6; }
  [[ -n $own ]] || { log "no own address for $nh"; return; }
  name=$(tun_name "$nh")
  if [[ $OTYPE == full ]] || ! same_subnet "$nh"; then
    if ! ip link show "$name" >/dev/null 2>&1; then
      if [[ $v == -6 ]]; then kind=ip6tnl mode=ip6ip6; else kind=ipip mode=ipip; fi
      if [[ $ENCAP == fou ]]; then
        # The port opens lazily with the first tunnel of the family (behaviour §2.4).
        ip $v fou add port "$EPORT" gue 2>/dev/null   # EEXIST when it is open
        ip $v link add name "$name" type $kind remote "$nh" local "$own" ttl 225 \
          encap gue encap-sport auto encap-dport "$EPORT" mode $mode
      elif [[ $v == -6 ]]; then
        ip -6 link add name "$name" type ip6tnl remote "$nh" local "$own" mode ip6ip6
      else
        ip link add name "$name" type ipip remote "$nh" local "$own"
      fi
      ip link set "$name" up
      log "tunnel $name -> $nh"
    fi
    ip $v route replace "$nh" dev "$name" table 77
    ip $v route replace "$cidr" dev "$name" src "$own" proto 17
  elif [[ $SAME == replace ]]; then
    ip $v route replace "$cidr" via "$nh" proto 17
  else
    while ip $v route del "$cidr" proto 17 2>/dev/null; do :; done
    ip link del "$name" 2>/dev/null
    ip $v route add "$cidr" via "$nh" proto 17
  fi
  log "learned $cidr via $nh"
}

# withdraw CIDR NH: nrc.go:651-673 - only the route while the next hop's session is up, else the
# route and the tunnel.
withdraw() {
  local cidr=$1 nh=$2 v=""
  [[ $nh == *:* ]] && v=-6
  while ip $v route del "$cidr" proto 17 2>/dev/null; do :; done
  if ! established "$nh"; then
    ip link del "$(tun_name "$nh")" 2>/dev/null
    log "withdrawn $cidr, tunnel to $nh removed"
  else
    log "withdrawn $cidr (tunnel to $nh kept)"
  fi
}

inject() {
  local c
  # The rule is added once, at start (behaviour §2.6 item 5).
  for c in ${KRS_PODS:-}; do
    if [[ $c == *:* ]]; then
      ip -6 rule show | grep -q "from $c lookup 77" || ip -6 rule add from "$c" lookup 77
    else
      ip rule show | grep -q "from $c lookup 77" || ip rule add from "$c" lookup 77
    fi
  done
  # GoBGP's best-path stream (what watchBgpUpdates reads), current table first; own paths (no
  # neighbor-ip) are skipped.
  local a
  # One monitor per family; --current dumps both families, so each keeps its own.
  for a in ipv4 ipv6; do
    gobgp monitor global rib --current -j -a $a | paths $a &
  done
  wait
}

# paths FAMILY: apply the monitor's lines (JSON arrays of paths) of that family.
paths() {
  local line what cidr nh
  while read -r line; do
    jq -r --arg fam "$1" 'if type == "array" then .[] else empty end |
           select(."neighbor-ip" != null) |
           select((.nlri.prefix | contains(":")) == ($fam == "ipv6")) |
           [(if .withdrawal then "W" else "A" end), .nlri.prefix,
            ([.attrs[] | select(.type == 3 or .type == 14) | .nexthop][0])] | @tsv' \
      <<<"$line" |
      while IFS=$'\t' read -r what cidr nh; do
        if [[ $what == W ]]; then withdraw "$cidr" "$nh"; else add "$cidr" "$nh"; fi
      done
  done
}

start() {
  local dir=$1 c t
  mkdir -p "$dir"
  config > "$dir/gobgpd.toml"
  local r=()
  ((GR > 0)) && r=(-r)   # kube-router sets LocalRestarting on every start with GR (§5)
  gobgpd -f "$dir/gobgpd.toml" -p "${r[@]}" --api-hosts 127.0.0.1:50051 --pprof-disable \
    >> "$dir/gobgpd.log" 2>&1 &
  echo $! > "$dir/gobgpd.pid"
  for t in $(seq 100); do
    gobgp global >/dev/null 2>&1 && break
    sleep 0.2
  done
  for c in ${KRS_PODS:-}; do
    if [[ $c == *:* ]]; then
      gobgp global rib add -a ipv6 "$c" nexthop "$IP6" origin igp
    else
      gobgp global rib add -a ipv4 "$c" nexthop "$IP4" origin igp
    fi
  done
  setsid bash "$0" inject >> "$dir/injector.log" 2>&1 < /dev/null &
  echo $! > "$dir/injector.pid"
}

stop() {
  local dir=$1 sig=$2
  [[ -f $dir/gobgpd.pid ]] && kill "-$sig" "$(cat "$dir/gobgpd.pid")" 2>/dev/null
  # The injector is a session leader (setsid): its monitors and jq go with the group.
  [[ -f $dir/injector.pid ]] && kill -TERM -- "-$(cat "$dir/injector.pid")" 2>/dev/null
  sleep 0.2
  rm -f "$dir/gobgpd.pid" "$dir/injector.pid"
}

case ${1:-} in
  config) config ;;
  inject) inject ;;
  start) start "${2:?start DIR}" ;;
  stop) stop "${2:?stop DIR}" KILL ;;
  cease) stop "${2:?cease DIR}" TERM ;;
  *) sed -n '2,/^set -u/p' "$0" | sed 's/^# \{0,1\}//;$d'; exit 2 ;;
esac
