pub fn run() {
    println!("switchyard {}", env!("CARGO_PKG_VERSION"));
}
