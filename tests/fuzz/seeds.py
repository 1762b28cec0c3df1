#!/usr/bin/env python3
"""seeds.py - (re)build tests/fuzz/seeds/<target>/ from material already in the repository:

* the netlink goldens of src/netlink/tests/*.rs (`const NAME: &[u8] = &[0x.., ...];`), kernel
  replies captured under Debian's 6.1 kernel and requests captured from iproute2/ipvsadm;
* the recorded API payloads of tests/data (watch lines, lists);
* a few kubeconfigs written here;
* for nl_socket, the goldens framed as datagrams (nlmsghdr + payload), acks and error acks
  with extended-ack TLVs.

Usage: python3 tests/fuzz/seeds.py   (writes tests/fuzz/seeds; deterministic)
"""
import os
import re
import shutil
import struct

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fuzz", "seeds")

ARRAY = re.compile(r"const ([A-Z0-9_]+): &\[u8\] = &\[(.*?)\];", re.S)


def arrays(path):
    text = open(path, encoding="utf-8").read()
    for name, body in ARRAY.findall(text):
        body = re.sub(r"//[^\n]*", "", body)
        vals = [int(v, 16) for v in re.findall(r"0x([0-9a-fA-F]{1,2})\b", body)]
        if vals:
            yield name.lower(), bytes(vals)


def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def nlmsg(ty, flags, payload, seq=1, pid=0):
    hdr = struct.pack("=IHHII", 16 + len(payload), ty, flags, seq, pid)
    pad = (4 - len(payload) % 4) % 4
    return hdr + payload + b"\0" * pad


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    nl = os.path.join(ROOT, "src", "netlink", "tests")
    route_map = {
        "link.rs": ["rtnl_link", "podns"],
        "addr.rs": ["rtnl_addr"],
        "route.rs": ["rtnl_route", "podns"],
        "rule.rs": ["rtnl_rule"],
        "fou.rs": ["fou", "genl_ctrl"],
        "ipvs.rs": ["ipvs", "genl_ctrl"],
    }
    framed = []
    for fname, targets in route_map.items():
        for name, data in arrays(os.path.join(nl, fname)):
            for t in targets:
                put(t, f"{fname[:-3]}-{name}", data)
            framed.append((fname, name, data))
    # nl_socket: datagrams as the kernel sends them.
    types = {"link.rs": 16, "addr.rs": 20, "route.rs": 24, "rule.rs": 32, "fou.rs": 0x20,
             "ipvs.rs": 0x21}
    for fname, name, data in framed:
        put("nl_socket", f"{fname[:-3]}-{name}", nlmsg(types[fname], 0x2, data))
    dump = b"".join(nlmsg(16, 0x2, d) for f, _, d in framed if f == "link.rs")
    put("nl_socket", "dump-links-done", dump + nlmsg(3, 0x2, struct.pack("=i", 0)))
    put("nl_socket", "ack-ok", nlmsg(2, 0x100, struct.pack("=i", 0) + nlmsg(16, 0x605, b"")[:16]))
    msg = b"Unknown device type\0"
    tlv = struct.pack("=HH", 4 + len(msg), 1) + msg
    tlv += b"\0" * ((4 - len(tlv) % 4) % 4)
    tlv += struct.pack("=HHI", 8, 5, 3)  # NLMSGERR_ATTR_MISS_TYPE
    put("nl_socket", "ack-extack-capped",
        nlmsg(2, 0x300, struct.pack("=i", -95) + nlmsg(16, 0x605, b"")[:16] + tlv))
    put("nl_socket", "ack-extack-echo",
        nlmsg(2, 0x200, struct.pack("=i", -17) + nlmsg(24, 0x505, b"\x02\x20\0\0" * 3) + tlv))
    put("nl_socket", "done-extack", nlmsg(3, 0x202, struct.pack("=i", -4) + tlv))
    put("nl_socket", "batch-acks",
        b"".join(nlmsg(2, 0x100, struct.pack("=i", -e) + nlmsg(16, 5, b"")[:16], seq=i)
                 for i, e in enumerate([0, 17, 0, 19, 0])))
    # API payloads.
    data = os.path.join(ROOT, "tests", "data")
    for fname in sorted(os.listdir(data)):
        text = open(os.path.join(data, fname), "rb").read()
        stem = fname.rsplit(".", 1)[0]
        lines = [l for l in text.split(b"\n") if l.startswith(b"{")]
        for i, l in enumerate(lines):
            put("watch_event", f"{stem}-{i}", l.rstrip(b"\r"))
        if fname.endswith(".json"):
            put("kube_list", stem, text)
            put("watch_stream", stem, bytes([128, 7, 0]) + text)
        if lines and not fname.endswith(".json"):
            body = b"\n".join(l.rstrip(b"\r") for l in lines) + b"\n"
            empty = b'{"kind":"NodeList","metadata":{"resourceVersion":"1"},"items":[]}'
            put("watch_stream", f"{stem}-stream", bytes([0, 13, 1]) + body)
            split = (len(empty) * 256 + len(empty) + len(body) - 1) // (len(empty) + len(body))
            put("watch_stream", f"{stem}-after-list", bytes([min(split, 255), 31, 0]) + empty + body)
    # Kubeconfigs.
    kc = {
        "token": """apiVersion: v1
kind: Config
current-context: c
clusters:
- name: k
  cluster:
    server: https://10.0.0.1:6443
    certificate-authority-data: dGVzdA==
    tls-server-name: kubernetes
contexts:
- name: c
  context: {cluster: k, user: u}
users:
- name: u
  user:
    token: abc.def
""",
        "certs-files": """apiVersion: v1
clusters:
- cluster: {server: "https://[fd00::1]:6443", certificate-authority: ca.crt}
  name: k
contexts:
- context: {cluster: k, user: admin}
  name: only
users:
- name: admin
  user: {client-certificate: a.crt, client-key: /etc/a.key, tokenFile: /run/t}
""",
        "no-context": "apiVersion: v1\nclusters: []\ncontexts: []\n",
        "anchors": "a: &x {server: s}\nclusters:\n- name: k\n  cluster: *x\ncurrent-context: c\n"
                   "contexts:\n- name: c\n  context: {cluster: k}\n",
    }
    for name, text in kc.items():
        put("kubeconfig", name, text.encode())

    # BGP: the golden messages of src/bgp/codec/tests.rs (GoBGP's and ours), framed, one per
    # seed, and all of them as one session stream.
    def bgp(ty, body):
        return b"\xff" * 16 + struct.pack(">HB", 19 + len(body), ty) + body
    stream = b""
    for name, body in arrays(os.path.join(ROOT, "src", "bgp", "codec", "tests.rs")):
        msg = bgp(1 if "open" in name else 2, body)
        put("bgp", name, msg)
        stream += msg + (bgp(4, b"") if "open" in name else b"")
    put("bgp", "session", stream + bgp(5, b"\x00\x01\x00\x01") + bgp(3, b"\x06\x02"))


if __name__ == "__main__":
    main()
