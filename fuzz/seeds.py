#!/usr/bin/env python3
"""Writes the seed corpus of each fuzz target under fuzz/corpus/<target>/ (committed; the
fuzzer adds what it finds when run long). Run from fuzz/."""
import os
import struct

def put(target, name, data):
    d = os.path.join("corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())

def qname(n):
    return b"".join(bytes([len(p)]) + p.encode() for p in n.rstrip(".").split(".") if p) + b"\0"

def query(qid, name, qtype, edns=False):
    h = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 1 if edns else 0)
    q = qname(name) + struct.pack(">HH", qtype, 1)
    opt = b"\0" + struct.pack(">HHIH", 41, 1232, 0, 0) if edns else b""
    return h + q + opt

Q = [
    ("web.shop.svc.cluster.local", 1), ("web.shop.svc.cluster.local", 28),
    ("_http._tcp.web.shop.svc.cluster.local", 33), ("web.shop.svc.cluster.local", 255),
    ("10.0.96.10.in-addr.arpa", 12), ("ext.shop.svc.cluster.local", 5),
    ("10-244-1-5.shop.pod.cluster.local", 1), ("nope.shop.svc.cluster.local", 1),
    ("cluster.local", 6), ("example.com", 1), ("web.shop.svc.cluster.local.shop.svc.cluster.local", 1),
]
for i, (n, t) in enumerate(Q):
    put("dns_request", f"udp-{i}", b"\0" + query(i, n, t, edns=i % 2 == 0))
tcp = b"".join(struct.pack(">H", len(m)) + m for m in (query(1, "web.shop.svc.cluster.local", 1, True), query(2, "_dns._udp.web.shop.svc.cluster.local", 33)))
put("dns_request", "tcp-2", b"\1" + tcp)

for f in sorted(os.listdir("../examples")):
    if f.endswith((".yaml", ".yml")):
        put("manifest", f, open(os.path.join("../examples", f)).read())
put("manifest", "zone.yaml", open("corpus-zone.yaml").read())

for i, s in enumerate(["app=web", "tier notin (frontend),env=prod", "!canary", "k8s.io/name in (a,b)", "x!=y,z==w", "env", "a in ()"]):
    put("selector", f"s{i}", s)

put("config", "switchyard", "clusterCIDR: 10.244.0.0/16\nsyncPeriod: 30s\nminSyncPeriod: 1s\nhealthzBindAddress: 0.0.0.0:10256\nnodePortAddresses: [primary, 10.0.0.0/8]\ndns:\n  listen: ['169.254.20.10:53']\n  upstream: ['service:kube-system/kube-dns', '10.0.0.2:53']\n  autopath: true\nlbAlgorithm: maglev\nmaglevTableSize: 16381\n")
put("config", "kube-proxy", "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: ipvs\nclusterCIDR: 10.100.0.0/16\nipvs: {scheduler: lc, tcpTimeout: 0s}\nconntrack: {maxPerCore: 0}\n---\napiVersion: switchyard.io/v1alpha1\nkind: SwitchyardConfiguration\ntcAttachMode: netlink\n")

def nla(t, v):
    n = 4 + len(v)
    return struct.pack("=HH", n, t) + v + b"\0" * ((4 - n % 4) % 4)

def tup(src, dst, sport, dport, proto=17):
    ip = nla(1, bytes(src)) + nla(2, bytes(dst))
    pr = nla(1, bytes([proto])) + nla(2, struct.pack(">H", sport)) + nla(3, struct.pack(">H", dport))
    return nla(0x8000 | 1, ip) + nla(0x8000 | 2, pr)

def ct(seq, orig, reply, cid):
    payload = struct.pack("=BBH", 2, 0, 0) + nla(0x8000 | 1, orig) + nla(0x8000 | 2, reply) + nla(12, struct.pack(">I", cid))
    return struct.pack("=IHHII", 16 + len(payload), 256, 2, seq, 0) + payload

dump = ct(1, tup([10, 0, 0, 1], [10, 96, 0, 10], 40000, 53), tup([10, 244, 1, 5], [10, 0, 0, 1], 53, 40000), 7)
dump += ct(1, tup([10, 0, 0, 2], [10, 96, 0, 11], 40001, 80, 6), tup([10, 244, 1, 6], [10, 0, 0, 2], 8080, 40001, 6), 8)
done = struct.pack("=IHHII", 20, 3, 2, 1, 0) + struct.pack("=i", 0)
put("conntrack", "dump", dump + done)
