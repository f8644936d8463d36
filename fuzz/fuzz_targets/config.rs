//! The configuration file: Switchyard's own settings and a KubeProxyConfiguration document,
//! parsed and validated. Every mistake is an error naming the field.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = Config::parse(text) {
        let _ = cfg.validate();
    }
});
