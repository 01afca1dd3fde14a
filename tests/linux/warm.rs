//! `kvmbuild exec --warm` on Debian's cloud kernel: the first run saves a snapshot at the
//! init's snapshot point, later runs start from it with their own shares, commands and
//! environments, fresh randomness and the right time; a damaged snapshot is replaced.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::exec::exec;
use super::guest::{cloud_kernel, run_guarded, scratch, Run};
use super::virtiofs::which_virtiofsd;

/// How many runs restore the snapshot: 10, or `KVMBUILD_WARM_RUNS` (the 50-run check
/// is `KVMBUILD_WARM_RUNS=50`; the suite keeps 10 for time).
fn warm_runs() -> usize {
    std::env::var(WARM_RUNS_VAR)
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10)
}

pub const WARM_RUNS_VAR: &str = "KVMBUILD_WARM_RUNS";

/// The guest prints its share's file, its boot id, 16 random bytes, its clock and its
/// environment's `RUN`, and exits with the number in its share's file.
const SCRIPT: &str = "cat /tmp/data/n; cat /proc/sys/kernel/random/boot_id; \
    head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s; echo \"run=$RUN\"; \
    exit $(cat /tmp/data/n)";

fn warm_run(cache: &Path, share: &Path, index: usize, console: &Path) -> Run {
    warm_run_with(cache, share, index, console, &[])
}

/// [`warm_run`] with more `exec` options.
fn warm_run_with(
    cache: &Path,
    share: &Path,
    index: usize,
    console: &Path,
    options: &[&str],
) -> Run {
    let share = format!("--share={}:/tmp/data:ro", share.display());
    let env = format!("--env=RUN={index}");
    let log = format!("--console-log={}", console.display());
    // -v with a console log keeps the kernel's messages (no `quiet`), which tell a cold boot.
    let mut args = vec!["--warm", "-v", &share, &env, &log];
    args.extend(options);
    args.extend(["--", "sh", "-c", SCRIPT]);
    let mut run = exec(cache, &args, b"");
    // The log lives in the test host's scratch space: keep it with the run for a failure.
    let log = std::fs::read_to_string(console).unwrap_or_default();
    let tail = log
        .char_indices()
        .map(|(i, _)| i)
        .find(|&i| i + 6000 >= log.len())
        .map_or("", |i| &log[i..]);
    run.stderr
        .push_str(&format!("--- console log (end) ---\n{tail}"));
    run
}

/// Checks that run `index` booted the kernel only if it is the first, the one that saves the
/// snapshot: its console log tells.
fn check_only_the_first_boots(run: &Run, console: &Path, index: usize) {
    let booted = std::fs::read_to_string(console)
        .unwrap_or_default()
        .contains("Linux version");
    run.check(
        booted == (index == 0),
        &format!("run {index} booted: {booted}"),
    );
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A restored run's memory was served as the guest touched it (the test host runs kvmbuild as
/// root, which userfaultfd needs for KVM's faults), and the guest touched less than the
/// snapshot holds: what it did not touch was never copied. From the second restored run on,
/// the pages the first one touched (its hot list) are placed ahead of the guest. The memory
/// file is checked beside the guest. Returns the KiB the snapshot holds: the same for every
/// run, as serving must not change the snapshot.
fn check_served_on_demand(run: &Run, with_hot_list: bool) -> u64 {
    let line = |prefix: &str| {
        run.stderr
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::to_owned)
    };
    let restored = line("kvmbuild: restored ").unwrap_or_default();
    run.check(
        restored.contains("(checked beside the guest; pages served as the guest touches them"),
        "the snapshot's memory is served on demand and checked beside the guest",
    );
    run.check(
        line("kvmbuild: snapshot memory checked in ").is_some(),
        "the check finished, and the run's settings waited for it",
    );
    run.check(
        restored.contains("hot pages ahead of it") == with_hot_list,
        &format!("a hot list is used: {with_hot_list}"),
    );
    let first_number = |text: &str| -> u64 {
        let number = text.split(' ').next().unwrap_or("");
        number.parse().unwrap_or(0)
    };
    let served_kib = line("kvmbuild: served ").map_or(0, |l| first_number(&l));
    let saved_kib = first_number(&restored) << 10;
    println!("warm: served {served_kib} KiB of {saved_kib} KiB on demand");
    run.check(
        served_kib > 0 && served_kib < saved_kib,
        "some but not all of the snapshot's memory was served",
    );
    saved_kib
}

/// The cold run saves a snapshot; [`warm_runs`] runs restore it, each with its own share,
/// command status and environment, and each with its own boot id, random bytes and the
/// host's time.
pub fn exec_warm_restores_one_snapshot_for_many_runs() {
    let dir = scratch("exec-warm");
    let cache = dir.join("cache");
    let mut seen_ids = Vec::new();
    let mut seen_random = Vec::new();
    let mut read_kib = Vec::new();
    for index in 0..=warm_runs() {
        let share = dir.join(format!("share{index}"));
        std::fs::create_dir_all(&share).unwrap();
        std::fs::write(share.join("n"), format!("{}\n", index + 3)).unwrap();
        let console = dir.join(format!("console{index}"));
        let before = now();
        let run = warm_run(&cache, &share, index, &console);
        let after = now();
        let boot_log = std::fs::read_to_string(&console).unwrap_or_default();
        run.check(
            run.status == Some(index as i32 + 3),
            &format!("run {index} status"),
        );
        let lines: Vec<&str> = run.console.lines().collect();
        run.check(lines.len() == 5, "five lines of output");
        run.check(lines[0] == (index + 3).to_string(), "the share's file");
        run.check(lines[4] == format!("run={index}"), "the run's environment");
        let clock: u64 = lines[3].parse().unwrap_or(0);
        run.check(
            clock + 1 >= before && clock <= after + 1,
            &format!("the guest's clock {clock} within a second of the host's {before}..{after}"),
        );
        // For the record (never asserted): exec -v says when the command started.
        if let Some(line) = run.stderr.lines().find(|l| l.contains("command started")) {
            println!(
                "warm: run {index} ({}): {line}",
                if index == 0 { "cold" } else { "restored" }
            );
        }
        if index > 0 {
            read_kib.push(check_served_on_demand(&run, index > 1));
        }
        seen_ids.push(lines[1].to_string());
        seen_random.push(lines[2].to_string());
        // Only the first run boots the kernel; the others start after it.
        let booted = boot_log.contains("Linux version");
        run.check(
            booted == (index == 0),
            &format!("run {index} booted: {booted}"),
        );
        if index == 0 {
            let snapshots = cache.join("kvmbuild/snapshots");
            let saved = std::fs::read_dir(&snapshots)
                .map(|d| d.count())
                .unwrap_or(0);
            run.check(saved == 1, "the cold run saved one snapshot");
        }
    }
    let distinct = |v: &Vec<String>| {
        let mut sorted = v.clone();
        sorted.sort();
        sorted.dedup();
        sorted.len() == v.len()
    };
    assert!(distinct(&seen_ids), "boot ids repeat: {seen_ids:?}");
    // A restore that filled the snapshot's holes would make the next one read more.
    assert!(
        read_kib.windows(2).all(|w| w[0] == w[1]),
        "the snapshot grew between restores (KiB read: {read_kib:?})"
    );
    assert!(
        distinct(&seen_random),
        "random bytes repeat: {seen_random:?}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// A warm run's disk is its own: the snapshot holds an empty slot where the disk goes, and
/// each restored run's guest probes its disk there, whatever its content and size.
pub fn exec_warm_attaches_each_runs_own_disk() {
    let dir = scratch("exec-warm-disk");
    let cache = dir.join("cache");
    for index in 0..3usize {
        let disk = dir.join(format!("disk{index}.img"));
        let mut bytes = format!("disk-{index}\n").into_bytes();
        bytes.resize((index + 1) << 20, 0);
        std::fs::write(&disk, &bytes).unwrap();
        let console = dir.join(format!("console{index}"));
        let run = exec(
            &cache,
            &[
                "--warm",
                "-v",
                &format!("--disk={}", disk.display()),
                &format!("--console-log={}", console.display()),
                "--",
                "sh",
                "-c",
                "head -n 1 /dev/vda && cat /sys/block/vda/size",
            ],
            b"",
        );
        run.check(run.status == Some(0), &format!("run {index} status"));
        let lines: Vec<&str> = run.console.lines().collect();
        let sectors = ((index + 1) << 11).to_string();
        run.check(
            lines == [format!("disk-{index}").as_str(), sectors.as_str()],
            &format!("run {index} reads its own disk of {} MiB", index + 1),
        );
        check_only_the_first_boots(&run, &console, index);
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// A snapshot whose memory file was damaged is found out before the command runs: the run boots
/// cold with a warning, succeeds, and saves a good snapshot that the next run restores.
pub fn exec_warm_replaces_a_damaged_snapshot() {
    let dir = scratch("exec-warm-damaged");
    let cache = dir.join("cache");
    let share = dir.join("share");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::write(share.join("n"), "0\n").unwrap();
    let console = dir.join("console");
    let first = warm_run(&cache, &share, 0, &console);
    first.check(first.status == Some(0), "the first run saves a snapshot");
    let snapshots = cache.join("kvmbuild/snapshots");
    let snapshot = std::fs::read_dir(&snapshots)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let memory = snapshot.join("memory");
    let mut bytes = std::fs::read(&memory).unwrap();
    let at = bytes.iter().rposition(|&b| b != 0).unwrap();
    bytes[at] ^= 0x5a;
    std::fs::write(&memory, bytes).unwrap();

    let run = warm_run(&cache, &share, 1, &console);
    run.check(
        run.status == Some(0),
        "the damaged snapshot's run still succeeds",
    );
    run.check(
        run.stderr.contains("not usable") && run.stderr.contains("checksum"),
        "a warning names the damage",
    );
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    run.check(log.contains("Linux version"), "it booted cold");

    let again = warm_run(&cache, &share, 2, &console);
    again.check(again.status == Some(0), "the new snapshot works");
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    again.check(!log.contains("Linux version"), "and is restored");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Reserves hugetlb pages in the test host while it lives, then gives them back.
struct HugePages {
    before: String,
}

impl HugePages {
    const KNOB: &'static str = "/proc/sys/vm/nr_hugepages";

    /// Reserves `pages` huge pages, first freeing the page cache and compacting memory so
    /// that earlier tests' files do not leave too few free 2 MiB runs.
    fn reserve(pages: usize) -> Self {
        let before = std::fs::read_to_string(Self::KNOB).unwrap();
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
        let _ = std::fs::write("/proc/sys/vm/compact_memory", "1");
        std::fs::write(Self::KNOB, pages.to_string()).unwrap();
        let reserved = Self { before };
        let free = Self::free();
        assert!(
            free >= pages,
            "the test host could reserve only {free} of {pages} huge pages"
        );
        reserved
    }

    fn free() -> usize {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix("HugePages_Free:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::KNOB, self.before.trim());
    }
}

/// On a host with free hugetlb pages, guest memory is on them; a snapshot is restored into it
/// by reading the memory file straight into its mapping (hugetlb files refuse `write(2)`),
/// and checked beside the guest. Before, every warm run there found its snapshot unusable
/// (the restore's `pwrite` failed), booted cold and saved it again.
pub fn exec_warm_restores_into_huge_pages() {
    let dir = scratch("exec-warm-huge");
    let cache = dir.join("cache");
    // 256 MiB of guest memory is 128 huge pages.
    let _pages = HugePages::reserve(128);
    for index in 0..3 {
        let share = dir.join(format!("share{index}"));
        std::fs::create_dir_all(&share).unwrap();
        std::fs::write(share.join("n"), format!("{}\n", index + 3)).unwrap();
        let console = dir.join(format!("console{index}"));
        let run = warm_run_with(&cache, &share, index, &console, &["--mem=256"]);
        run.check(
            run.status == Some(index as i32 + 3),
            &format!("run {index} status"),
        );
        run.check(
            run.stderr.contains("guest memory on hugetlb"),
            "guest memory is on hugetlb pages",
        );
        run.check(!run.stderr.contains("not usable"), "the snapshot is usable");
        check_only_the_first_boots(&run, &console, index);
        if index > 0 {
            run.check(
                run.stderr.contains(
                    "(copied: guest memory is on hugetlb pages; checked beside the guest)",
                ),
                "the restore read the snapshot into the huge pages, checked beside the guest",
            );
        }
        if let Some(line) = run.stderr.lines().find(|l| l.contains("guest phases")) {
            println!("warm on huge pages: run {index}: {line}");
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// Two runs restored from one snapshot at the same time each get their own share, status,
/// environment and randomness: the snapshot is only read, and each run has its own memory.
pub fn exec_warm_runs_concurrently_from_one_snapshot() {
    let dir = scratch("exec-warm-concurrent");
    let cache = dir.join("cache");
    let share = |index: usize| {
        let path = dir.join(format!("share{index}"));
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(path.join("n"), format!("{}\n", index + 3)).unwrap();
        path
    };
    let first = warm_run(&cache, &share(0), 0, &dir.join("console0"));
    first.check(first.status == Some(3), "the cold run saves the snapshot");
    let runs: Vec<(usize, Run)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (1..=2)
            .map(|index| {
                let (cache, share) = (&cache, share(index));
                let console = dir.join(format!("console{index}"));
                scope.spawn(move || (index, warm_run(cache, &share, index, &console)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ids = Vec::new();
    for (index, run) in &runs {
        run.check(
            run.status == Some(*index as i32 + 3),
            &format!("run {index} status"),
        );
        let lines: Vec<&str> = run.console.lines().collect();
        run.check(lines.len() == 5, "five lines of output");
        run.check(lines[0] == (index + 3).to_string(), "its own share");
        run.check(lines[4] == format!("run={index}"), "its own environment");
        ids.push(lines[1].to_string());
    }
    assert_ne!(ids[0], ids[1], "the two restored runs share a boot id");
    std::fs::remove_dir_all(dir).unwrap();
}

/// `bench --exec --warm`: cold and restored runs of one command in alternation, in one JSON
/// report. The figures are printed for the record (a benchmark, never asserted); what is
/// checked is that the report holds both series and that every warm run restored.
pub fn bench_exec_warm_reports_cold_and_restored_runs() {
    let dir = scratch("bench-warm");
    let json = dir.join("warm.json");
    let kernel = cloud_kernel();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvmbuild"));
    cmd.args(["bench", "--exec", "--warm", "--runs", "3", "--warmup", "0"])
        .args(["--timeout", "240", "--kernel"])
        .arg(&kernel.vmlinux)
        .arg(format!("--exec-arg=--modules={}", kernel.modules.display()))
        .arg(format!(
            "--exec-arg=--virtiofsd={}",
            which_virtiofsd().display()
        ))
        .arg("--json")
        .arg(&json)
        .args(["--", "true"])
        .env("XDG_CACHE_HOME", dir.join("cache"));
    let run = run_guarded(cmd, Duration::from_secs(900));
    run.check(run.status == Some(0), "bench --exec --warm succeeds");
    let text = std::fs::read_to_string(&json).unwrap();
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    let warm = &report["warm"];
    let median = |v: &serde_json::Value| v["median_ms"].as_f64().unwrap_or(0.0);
    assert!(report["process"]["wall"]["min_ms"].is_f64(), "{text}");
    assert!(
        median(&warm["restored_mib"]) > 0.0,
        "warm runs restored memory: {text}"
    );
    let ratio = &warm["cold_over_warm_to_command"];
    assert!(ratio["ratio_of_medians"].as_f64().is_some(), "{text}");
    let to_command = |phases: &serde_json::Value| {
        phases
            .as_array()
            .and_then(|p| p.iter().find(|p| p["phase"] == "start"))
            .map_or(0.0, median)
    };
    println!(
        "bench warm: to command started, cold median {:.0} ms, warm median {:.0} ms \
         (restore {:.0} ms of {:.0} MiB); cold/warm {:.2} (median of round ratios {:.2})",
        to_command(&report["exec_phases"]),
        to_command(&warm["exec_phases"]),
        median(&warm["restore"]),
        median(&warm["restored_mib"]),
        ratio["ratio_of_medians"].as_f64().unwrap_or(0.0),
        ratio["median_of_pair_ratios"].as_f64().unwrap_or(0.0),
    );
    std::fs::remove_dir_all(dir).unwrap();
}
