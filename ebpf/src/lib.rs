#![no_std]
// The kernel programs live in the `switchyard` binary target (src/main.rs); this empty library
// lets the userspace crate depend on this package so cargo rebuilds when it changes.
