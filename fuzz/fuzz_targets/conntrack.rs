//! The ctnetlink dump decoder: a received datagram split into netlink messages, each
//! decoded as a conntrack entry; a decoded entry's delete request decodes back to the same
//! original tuple.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard::conntrack::codec::{delete_request, parse_entry};
use switchyard::nl;

fuzz_target!(|data: &[u8]| {
    for m in nl::messages(data) {
        let _ = m.error();
        if let Some(e) = parse_entry(m.payload) {
            let req = delete_request(&e, m.seq);
            let back: Vec<_> = nl::messages(&req).collect();
            assert_eq!(back.len(), 1, "one delete message");
            assert_eq!(back[0].seq, m.seq);
        }
    }
});
