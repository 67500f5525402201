//! Prints the path of the cached busybox test rootfs, building it first if needed
//! (`make run` uses it).

fn main() {
    println!("{}", cordon_testkit::test_rootfs().display());
}
