//! P11 and P12: the microVM backend (`MicrovmRuntime`), under the accelerator its probe picks
//! (KVM when a probe VM proves it works, TCG otherwise; every row names it).
//!
//! - P11: boot to ready = `create` + `start` of a sandbox, until the agent answered its
//!   handshake (what `start` returns on); `CORDON_BENCH_VM_ROUNDS` (5) rounds. Beside it, in
//!   the same run, a bare `qemu-system-x86_64 -M microvm` boot of the same kernel with the same
//!   machine and accelerator flags to its init: a tiny initramfs whose `/init` is a static
//!   program that powers the VM off at once; QEMU start → exit.
//! - P12: host memory of a booted idle microVM beyond guest RAM: QEMU's PSS
//!   (`/proc/<pid>/smaps_rollup`) minus the PSS of the guest RAM block (the anonymous mapping
//!   whose size is the VM's `-m`), i.e. what QEMU costs beyond the guest RAM actually touched.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cordon_runtime::{
    Accel, Backend, Limits, MicrovmConfig, MicrovmRuntime, Runtime, SandboxState,
};
use cordon_testkit::{spec, TestOptions};

use crate::{ms, percentiles, Table};

const DEFAULT_ROUNDS: usize = 5;
/// Guest RAM of the benchmark VMs (and of the bare baseline).
const GUEST_MEMORY_MIB: u64 = 256;
const DISK_BYTES: u64 = 64 << 20;
/// The bare boot must reach its init and power off within this (a failed init hangs: the
/// baseline's kernel gets no `panic=-1`, so a panic cannot pass for a boot).
const BARE_BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const QEMU: &str = "/usr/bin/qemu-system-x86_64";
/// The runtime's machine flags (crates/cordon-runtime/src/microvm/qemu.rs, `MACHINE`).
const MACHINE: &str = "microvm,x-option-roms=off,pit=off,pic=off,rtc=off,isa-serial=off";
/// TCG's translation cache, as the runtime sets it.
const TCG_TB_SIZE_MIB: u64 = 64;
/// A static init that powers the VM off at once.
const POWEROFF_INIT_C: &str = r#"#include <sys/reboot.h>
#include <unistd.h>
int main(void) { sync(); reboot(RB_POWER_OFF); for (;;) pause(); }
"#;

/// The `microvm` section: P11 and P12 rows, or a note saying why they were not measured.
pub(crate) async fn microvm(state_dir: &Path, table: &mut Table) -> Result<()> {
    let rounds = std::env::var("CORDON_BENCH_VM_ROUNDS")
        .ok()
        .and_then(|rounds| rounds.parse().ok())
        .filter(|&rounds: &usize| rounds > 0)
        .unwrap_or(DEFAULT_ROUNDS);
    let guest = guest_kernel()?;
    let work = state_dir.join("microvm-bench");
    std::fs::create_dir_all(&work)?;
    let initramfs = work.join("initramfs");
    cordon_image::guest::build_initramfs(&guest, &cordon_testkit::agent_binary(), &initramfs)
        .context("build the initramfs")?;
    let runtime = runtime(&work.join("state"), &guest.kernel, &initramfs)?;
    let accel = runtime.acceleration().await;
    let label = match accel {
        Accel::Kvm => "KVM",
        Accel::Tcg => "TCG",
    };

    let boots = cordon_boots(&runtime, rounds).await?;
    let bare_initramfs = poweroff_initramfs(&work)?;
    let bare = (0..rounds)
        .map(|_| bare_boot(&guest.kernel, &bare_initramfs, accel))
        .collect::<Result<Vec<_>>>()?;
    let target = match accel {
        Accel::Kvm => "≤ 150 ms",
        Accel::Tcg => "≤ 1.5 s",
    };
    table.row(
        &format!("P11 microVM create + start to agent ready ({label})"),
        &boots.total,
        &format!("bare qemu -M microvm, same kernel, init powers off ({label})"),
        &bare,
        target,
    );
    for (phase, samples) in [
        ("create (disk images)", &boots.create),
        ("start (jail + QEMU + boot + handshake)", &boots.start),
    ] {
        let (p50, p95) = percentiles(samples);
        table.row_text([
            &format!("P11 breakdown: {phase} ({label})"),
            &format!("{} / {}", ms(p50), ms(p95)),
            "",
            "",
            "",
            "",
        ]);
    }

    let overhead = p12(&runtime).await?;
    table.row_text([
        &format!("P12 microVM host overhead beyond guest RAM ({label}, idle)"),
        &mib(overhead.overhead_kib),
        "QEMU PSS total / guest RAM touched",
        &format!(
            "{} / {}",
            mib(overhead.total_pss_kib),
            mib(overhead.guest_ram_pss_kib)
        ),
        "",
        "≤ 30 MiB",
    ]);
    table.notes.push(format!(
        "P12 breakdown (PSS): file-backed (QEMU binary, libraries) {}, anonymous executable \
         (TCG code buffer) {}, other anonymous (heap, stacks, device state) {}.",
        mib(overhead.file_pss_kib),
        mib(overhead.exec_anon_pss_kib),
        mib(overhead
            .overhead_kib
            .saturating_sub(overhead.file_pss_kib + overhead.exec_anon_pss_kib)),
    ));
    table.notes.push(format!(
        "P11/P12: {rounds} rounds, {GUEST_MEMORY_MIB} MiB guest RAM, 1 layer (busybox rootfs), \
         accelerator {label} (the runtime's probe); cordon's QEMU runs jailed (cordon-nsinit), \
         the bare baseline unjailed with the runtime's machine/accelerator flags, no devices, \
         `{}`. P12 = PSS of QEMU (smaps_rollup) minus the PSS of its anonymous mapping of \
         {GUEST_MEMORY_MIB} MiB (the guest RAM block, found by its size = -m): QEMU's own \
         memory beyond the guest RAM the guest touched{}.",
        bare_cmdline(accel),
        if accel == Accel::Tcg {
            format!(" (includes TCG's translation cache, ≤ {TCG_TB_SIZE_MIB} MiB)")
        } else {
            String::new()
        },
    ));
    Ok(())
}

fn guest_kernel() -> Result<cordon_image::guest::GuestKernel> {
    let cache = Path::new(cordon_image::guest::DEFAULT_CACHE_DIR);
    match cordon_image::guest::load_guest_kernel(cache) {
        Some(kernel) => Ok(kernel),
        None => cordon_image::guest::prepare_guest_kernel(cache, &mut |line| {
            eprintln!("guest kernel: {line}")
        })
        .context("prepare the guest kernel (cordon prepare)"),
    }
}

fn runtime(state: &Path, kernel: &Path, initramfs: &Path) -> Result<Arc<MicrovmRuntime>> {
    let nsinit = std::env::var_os("CORDON_NSINIT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(|dir| dir.join("cordon-nsinit")))
                .unwrap_or_default()
        });
    let mut config = MicrovmConfig::new(state, nsinit, kernel, initramfs);
    config.boot_timeout = Duration::from_secs(120);
    Ok(Arc::new(MicrovmRuntime::new(config)?))
}

fn vm_spec(id: &str) -> cordon_runtime::SandboxSpec {
    let mut spec = spec(id, &TestOptions::default());
    spec.backend = Backend::Microvm;
    spec.limits = Limits {
        memory_bytes: Some(GUEST_MEMORY_MIB << 20),
        disk_bytes: Some(DISK_BYTES),
        ..Limits::default()
    };
    spec
}

#[derive(Default)]
struct Boots {
    create: Vec<Duration>,
    start: Vec<Duration>,
    total: Vec<Duration>,
}

async fn cordon_boots(runtime: &MicrovmRuntime, rounds: usize) -> Result<Boots> {
    let mut boots = Boots::default();
    for round in 0..rounds {
        let id = format!("bench-vm-{}-{round}", std::process::id());
        let began = Instant::now();
        runtime.create(vm_spec(&id)).await?;
        let created = Instant::now();
        let started = runtime.start(&id).await;
        let ready = Instant::now();
        runtime.destroy(&id).await?;
        started.with_context(|| format!("start microVM {id}"))?;
        boots.create.push(created - began);
        boots.start.push(ready - created);
        boots.total.push(ready - began);
    }
    Ok(boots)
}

/// The kernel command line of the bare boot: the runtime's, less `cordon.*` and `panic=-1`.
fn bare_cmdline(accel: Accel) -> String {
    let mut line = "console=hvc0 quiet".to_string();
    if accel == Accel::Tcg {
        line.push(' ');
        line.push_str(&cordon_image::guest::tcg_kernel_args());
    }
    line
}

/// One bare boot: QEMU start until it exits after the init powered the VM off.
fn bare_boot(kernel: &Path, initramfs: &Path, accel: Accel) -> Result<Duration> {
    let mut command = Command::new(QEMU);
    command.args([
        "-M",
        MACHINE,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-m",
        &format!("{GUEST_MEMORY_MIB}M"),
        "-smp",
        "1",
    ]);
    match accel {
        Accel::Kvm => command.args(["-accel", "kvm", "-cpu", "host"]),
        Accel::Tcg => command.args([
            "-accel",
            &format!("tcg,tb-size={TCG_TB_SIZE_MIB}"),
            "-cpu",
            "max",
        ]),
    };
    command
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initramfs)
        .arg("-append")
        .arg(bare_cmdline(accel))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let began = Instant::now();
    let mut child = command.spawn().context("start qemu-system-x86_64")?;
    loop {
        if let Some(status) = child.try_wait()? {
            let elapsed = began.elapsed();
            if !status.success() {
                let mut stderr = String::new();
                if let Some(mut pipe) = child.stderr.take() {
                    std::io::Read::read_to_string(&mut pipe, &mut stderr).ok();
                }
                bail!("bare qemu boot failed: {status}: {}", stderr.trim());
            }
            return Ok(elapsed);
        }
        if began.elapsed() > BARE_BOOT_TIMEOUT {
            child.kill().ok();
            child.wait().ok();
            bail!("bare qemu boot did not power off within {BARE_BOOT_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The baseline's initramfs: `/init` = a static program that powers off at once (gcc -static).
fn poweroff_initramfs(work: &Path) -> Result<PathBuf> {
    let source = work.join("poweroff.c");
    let binary = work.join("poweroff");
    std::fs::write(&source, POWEROFF_INIT_C)?;
    let status = Command::new("gcc")
        .args(["-static", "-Os", "-s", "-o"])
        .arg(&binary)
        .arg(&source)
        .status()
        .context("run gcc (the bare baseline's init is built with gcc -static)")?;
    ensure!(status.success(), "gcc -static failed: {status}");
    let out = work.join("poweroff.cpio");
    let mut cpio = std::io::BufWriter::new(std::fs::File::create(&out)?);
    newc_entry(&mut cpio, 1, "init", 0o100_755, &std::fs::read(&binary)?)?;
    newc_entry(&mut cpio, 2, "TRAILER!!!", 0, &[])?;
    cpio.flush()?;
    Ok(out)
}

/// One entry of a `newc` cpio archive (the initramfs format).
fn newc_entry(out: &mut impl Write, ino: u32, name: &str, mode: u32, data: &[u8]) -> Result<()> {
    let name_len = name.len() + 1;
    let nlink = u32::from(mode != 0);
    let fields = [
        ino,
        mode,
        0,
        0,
        nlink,
        0,
        u32::try_from(data.len())?,
        0,
        0,
        0,
        0,
        u32::try_from(name_len)?,
        0,
    ];
    let mut header = String::from("070701");
    for field in fields {
        header.push_str(&format!("{field:08x}"));
    }
    out.write_all(header.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    out.write_all(&[0; 3][..pad4(header.len() + name_len)])?;
    out.write_all(data)?;
    out.write_all(&[0; 3][..pad4(data.len())])?;
    Ok(())
}

fn pad4(len: usize) -> usize {
    (4 - len % 4) % 4
}

struct Overhead {
    total_pss_kib: u64,
    /// Mappings of files (QEMU's binary and libraries), shared pages counted pro rata.
    file_pss_kib: u64,
    /// Anonymous executable mappings: TCG's translated code.
    exec_anon_pss_kib: u64,
    guest_ram_pss_kib: u64,
    overhead_kib: u64,
}

/// P12 on one booted, idle VM (after a short settle so boot-time transients are gone).
async fn p12(runtime: &MicrovmRuntime) -> Result<Overhead> {
    let id = format!("bench-vm-idle-{}", std::process::id());
    runtime.create(vm_spec(&id)).await?;
    let measured = async {
        runtime.start(&id).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let pid = match runtime.state(&id).await? {
            SandboxState::Running { pid } => pid,
            other => bail!("microVM not running: {other:?}"),
        };
        qemu_overhead(pid)
    }
    .await;
    runtime.destroy(&id).await?;
    measured
}

fn qemu_overhead(pid: u32) -> Result<Overhead> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("read /proc/{pid}/smaps_rollup"))?;
    let total_pss_kib = field_kib(&rollup, "Pss:").context("Pss in smaps_rollup")?;
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("read /proc/{pid}/smaps"))?;
    let guest_ram_pss_kib = guest_ram_pss_kib(&smaps, GUEST_MEMORY_MIB * 1024)
        .context("no anonymous mapping of the guest RAM's size in QEMU's smaps")?;
    let (file_pss_kib, exec_anon_pss_kib) = other_pss_kib(&smaps);
    Ok(Overhead {
        total_pss_kib,
        file_pss_kib,
        exec_anon_pss_kib,
        guest_ram_pss_kib,
        overhead_kib: total_pss_kib.saturating_sub(guest_ram_pss_kib),
    })
}

/// The PSS of the anonymous mapping(s) exactly `size_kib` large: QEMU's guest RAM block.
fn guest_ram_pss_kib(smaps: &str, size_kib: u64) -> Option<u64> {
    let mut found = None;
    for block in mappings(smaps) {
        let header = block.first()?;
        // Anonymous: no path after the inode field (address perms offset dev inode [path]).
        let anonymous = header.split_whitespace().nth(5).is_none();
        let body = block[1..].join("\n");
        if anonymous && field_kib(&body, "Size:") == Some(size_kib) {
            *found.get_or_insert(0) += field_kib(&body, "Pss:")?;
        }
    }
    found
}

/// PSS of file mappings and of anonymous executable mappings (where the overhead goes).
fn other_pss_kib(smaps: &str) -> (u64, u64) {
    let (mut file, mut exec_anon) = (0, 0);
    for block in mappings(smaps) {
        let mut header = block[0].split_whitespace();
        let perms = header.nth(1).unwrap_or("");
        let path = header.nth(3);
        let pss = field_kib(&block[1..].join("\n"), "Pss:").unwrap_or(0);
        match path {
            Some(path) if path.starts_with('/') => file += pss,
            None if perms.contains('x') => exec_anon += pss,
            _ => {}
        }
    }
    (file, exec_anon)
}

/// smaps split into mappings: a header line (`start-end perms …`) and its `Field: N kB` lines.
fn mappings(smaps: &str) -> Vec<Vec<&str>> {
    let mut blocks: Vec<Vec<&str>> = Vec::new();
    for line in smaps.lines() {
        let is_header = line
            .split_whitespace()
            .next()
            .is_some_and(|first| first.contains('-') && !first.ends_with(':'));
        match blocks.last_mut() {
            Some(block) if !is_header => block.push(line),
            _ => blocks.push(vec![line]),
        }
    }
    blocks
}

fn field_kib(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 1234 /usr/bin/qemu-system-x86_64
Size:               1024 kB
Pss:                 512 kB
7f0000000000-7f0010000000 rw-p 00000000 00:00 0 
Size:             262144 kB
Pss:               40960 kB
7f0010000000-7f0014000000 rw-p 00000000 00:00 0 
Size:              65536 kB
Pss:               20000 kB
";

    #[test]
    fn the_guest_ram_block_is_the_anonymous_mapping_of_its_size() {
        assert_eq!(guest_ram_pss_kib(SMAPS, 262_144), Some(40_960));
        assert_eq!(
            guest_ram_pss_kib(SMAPS, 1024),
            None,
            "file mappings are not RAM"
        );
        assert_eq!(guest_ram_pss_kib(SMAPS, 4), None);
    }

    #[test]
    fn newc_entries_are_padded_to_four_bytes() {
        let mut out = Vec::new();
        newc_entry(&mut out, 1, "init", 0o100_755, b"abcde").unwrap();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 4, 0);
        assert_eq!(&out[110..115], b"init\0");
    }
}
