//! Which CPU takes a block device's completion interrupts, from `/sys` and `/proc/interrupts`.
//!
//! A reactor there completes its device IO without a cross-CPU wake-up. On a 2-vCPU VM, fio
//! does ~40 % more 4 KiB random reads on the virtio disk's interrupt CPU than on the other, and
//! so does the engine (docs/performance.md, "Engine on a file ÷ raw fio").

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The core a lone reactor runs on, among `available`: `irq_cpu` (the core taking its device's
/// interrupts) when it is one of them, else the last. The engine places its one reactor on a
/// small machine this way, and the bench its engine-vs-raw comparison, so both agree.
pub fn lone_reactor_core(irq_cpu: Option<usize>, available: &[usize]) -> Option<usize> {
    irq_cpu
        .filter(|c| available.contains(c))
        .or(available.last().copied())
}

/// The CPU that takes the completion interrupts of the block device holding `file` (or of
/// `file` itself, a block device node; for a file not created yet, of its directory), and the
/// interrupt's name (e.g. `(1, "virtio1-req.0")`): the CPU with the most of them so far. None
/// when it cannot be told (no block device behind it, no interrupts yet, no /proc or /sys).
pub fn device_irq_cpu(file: &Path) -> Option<(usize, String)> {
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(file)
        .or_else(|e| {
            let dir = file.parent().filter(|p| !p.as_os_str().is_empty());
            std::fs::metadata(dir.unwrap_or(Path::new("."))).map_err(|_| e)
        })
        .ok()?;
    let dev = if meta.file_type().is_block_device() {
        meta.rdev()
    } else {
        meta.dev()
    };
    let sys = format!("/sys/dev/block/{}:{}", libc::major(dev), libc::minor(dev));
    let mut node = std::fs::canonicalize(sys).ok()?;
    if node.join("partition").exists() {
        node = node.parent()?.to_path_buf();
    }
    // The driver's device (virtio1, nvme0, …) names the interrupts of its queues.
    let device = std::fs::canonicalize(node.join("device")).ok()?;
    let controller = if device.file_name()?.to_str()?.starts_with("nvme") {
        device
    } else {
        device
            .ancestors()
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("virtio"))
            })?
            .to_path_buf()
    };
    let name = controller.file_name()?.to_str()?.to_string();
    let text = std::fs::read_to_string("/proc/interrupts").ok()?;
    busiest_irq_cpu(&text, &name)
}

/// In `/proc/interrupts` text: among interrupts whose name starts with `prefix` followed by a
/// non-digit (`virtio1` matches `virtio1-req.0`, not `virtio10-…`), the CPU column with the
/// largest count, and that interrupt's name.
pub fn busiest_irq_cpu(text: &str, prefix: &str) -> Option<(usize, String)> {
    let mut lines = text.lines();
    let cpus: Vec<usize> = lines
        .next()?
        .split_whitespace()
        .map(|c| c.strip_prefix("CPU")?.parse().ok())
        .collect::<Option<_>>()?;
    let mut best: Option<(u64, usize, String)> = None;
    for line in lines {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(name) = fields.last() else { continue };
        let matches = name
            .strip_prefix(prefix)
            .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()));
        if !matches || fields.len() < cpus.len() + 1 {
            continue;
        }
        for (i, count) in fields[1..=cpus.len()].iter().enumerate() {
            let Ok(count) = count.parse::<u64>() else {
                continue;
            };
            if count > 0 && best.as_ref().is_none_or(|b| count > b.0) {
                best = Some((count, cpus[i], name.to_string()));
            }
        }
    }
    best.map(|(_, cpu, name)| (cpu, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lone_reactor_goes_to_the_interrupt_core_when_it_may() {
        assert_eq!(lone_reactor_core(Some(0), &[0, 1]), Some(0));
        assert_eq!(lone_reactor_core(None, &[0, 1]), Some(1));
        assert_eq!(lone_reactor_core(Some(5), &[0, 1]), Some(1));
        assert_eq!(lone_reactor_core(Some(0), &[]), None);
    }

    #[test]
    fn irq_cpu_of_a_device() {
        let text = "           CPU0       CPU1       \n\
 35:          0          1  PCI-MSIX-0000:00:02.0   0-edge      virtio1-config\n\
 36:          5   26606119  PCI-MSIX-0000:00:02.0   1-edge      virtio1-req.0\n\
 37:     900000000      0  PCI-MSIX-0000:00:03.0   0-edge      virtio10-req.0\n\
 NMI:          0          0   Non-maskable interrupts\n\
 44:        300         20  PCI-MSIX-0000:01:00.0   1-edge      nvme0q1\n\
 45:         10        200  PCI-MSIX-0000:01:00.0   2-edge      nvme0q2\n";
        assert_eq!(
            busiest_irq_cpu(text, "virtio1"),
            Some((1, "virtio1-req.0".to_string()))
        );
        assert_eq!(
            busiest_irq_cpu(text, "nvme0"),
            Some((0, "nvme0q1".to_string()))
        );
        assert_eq!(busiest_irq_cpu(text, "virtio7"), None);
        assert_eq!(busiest_irq_cpu("", "virtio1"), None);
        assert_eq!(
            busiest_irq_cpu("garbage\n 1: x y virtio1-req.0\n", "virtio1"),
            None
        );
    }
}
