//! kubectl's label selector syntax (`-l`): parse, then match against a fixed label set.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use switchyard_model::selector::Selector;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(sel) = Selector::parse(text) {
        let labels: BTreeMap<String, String> = [("app", "web"), ("env", "prod"), ("tier", "")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let _ = sel.matches(&labels);
        let _ = sel.matches(&BTreeMap::new());
    }
});
