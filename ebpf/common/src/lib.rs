//! `#[repr(C)]` map keys and values shared by the kernel programs and userspace.
//! Every type has explicit padding fields and a compile-time size check, so both sides agree
//! byte for byte.
#![no_std]

/// Key of the services map: a frontend (address, port, protocol) and its scope.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceKey4 {
    /// Network byte order.
    pub addr: u32,
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    /// 0 = external traffic, 1 = internal (cluster) traffic.
    pub scope: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey4>() == 8);

/// Identity of a connection-level flag set programmed by userspace (placeholder for the
/// eBPF dataplane issue; the layout is final).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceValue {
    pub count: u32,
    pub rev_nat_index: u16,
    pub flags: u8,
    pub pad: u8,
    pub affinity_timeout: u32,
    pub service_id: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 16);

#[cfg(feature = "user")]
#[allow(unsafe_code)]
mod user {
    // SAFETY: plain-old-data, #[repr(C)], no implicit padding (checked by the size asserts).
    unsafe impl aya::Pod for super::ServiceKey4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceValue {}
}
