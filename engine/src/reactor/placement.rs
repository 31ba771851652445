//! Where reactors run: one per core by default, or one on the core that takes the devices'
//! interrupts on small machines.

use crate::device::{DeviceConfig, DeviceKind};
use crate::error::EngineError;

/// The cores this process may run on (empty when that cannot be told).
fn available_cores() -> Vec<usize> {
    core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect()
}

/// The core taking the interrupts of the first device that does block IO (a file or a block
/// device), and the interrupt's name.
pub(crate) fn device_irq_core(devices: &[DeviceConfig]) -> Option<(usize, String)> {
    devices
        .iter()
        .filter(|d| matches!(d.kind, DeviceKind::File | DeviceKind::Blockdev))
        .find_map(|d| crate::irq::device_irq_cpu(d.path.as_deref()?))
}

/// Reactor cores: `wanted`, or by default one per core; on a machine with two cores or fewer,
/// one reactor, on `preferred` (the core taking the devices' interrupts) when it is available,
/// else on the last core.
pub(crate) fn select_cores(
    wanted: &[usize],
    preferred: Option<usize>,
) -> Result<Vec<Option<usize>>, EngineError> {
    let available = available_cores();
    if wanted.is_empty() {
        if available.is_empty() {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            return Ok(vec![None; n]);
        }
        // On a machine with two cores or fewer, a polling reactor on every core leaves nothing
        // for anything else (local clients, the kernel's network stack): one reactor, where
        // its device completes IO without a cross-core wake-up, else on the last core. Larger
        // machines get one per core.
        if available.len() <= 2 {
            return Ok(vec![crate::irq::lone_reactor_core(preferred, &available)]);
        }
        return Ok(available.into_iter().map(Some).collect());
    }
    if wanted.len() > 256 {
        return Err(EngineError::Config("at most 256 cores".into()));
    }
    for c in wanted {
        if !available.is_empty() && !available.contains(c) {
            return Err(EngineError::Config(format!(
                "core {c} is not available (this machine offers {available:?})"
            )));
        }
    }
    let mut seen = std::collections::HashSet::new();
    if !wanted.iter().all(|c| seen.insert(*c)) {
        return Err(EngineError::Config(format!(
            "cores {wanted:?} lists a core twice"
        )));
    }
    Ok(wanted.iter().copied().map(Some).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_machines_run_one_reactor_on_the_preferred_core() {
        let available = available_cores();
        if available.is_empty() {
            return crate::required::skip(
                "small_machines_run_one_reactor_on_the_preferred_core",
                "no CPU affinity information here: nothing to choose from",
            );
        }
        if available.len() > 2 {
            // One reactor per core there; the preference does not apply.
            let all: Vec<_> = available.iter().map(|&c| Some(c)).collect();
            assert_eq!(select_cores(&[], Some(available[0])).unwrap(), all);
            return;
        }
        let first = available[0];
        let last = *available.last().unwrap();
        assert_eq!(select_cores(&[], Some(first)).unwrap(), vec![Some(first)]);
        assert_eq!(select_cores(&[], None).unwrap(), vec![Some(last)]);
        // A preferred core this process may not use is ignored.
        assert_eq!(select_cores(&[], Some(10_000)).unwrap(), vec![Some(last)]);
        // An explicit list wins over the preference.
        assert_eq!(
            select_cores(&[last], Some(first)).unwrap(),
            vec![Some(last)]
        );
    }
}
