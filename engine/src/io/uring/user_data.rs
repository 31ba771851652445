//! What a ring entry's `user_data` names: the one encoding every op pushed into a reactor's
//! ring uses, and the completion reaper decodes.

/// The owner of a ring entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum UserData {
    /// A device op, by its slot in the ring's op table.
    Device { slot: u32 },
    /// A raw op of a task: the task's number on its reactor, and the tag the task chose.
    Task { task_id: u32, tag: u32 },
    /// The read of the reactor's wake-up eventfd.
    Wake,
}

/// Bit 63: a task's op (bits 32..63 its task, 0..32 its tag). Clear: a device op's slot.
const TASK_BIT: u64 = 1 << 63;
/// All ones: the wake-up read. No task op has it (task numbers stay far below 2^31).
const WAKE: u64 = u64::MAX;

impl UserData {
    #[inline]
    pub(crate) const fn encode(self) -> u64 {
        match self {
            UserData::Device { slot } => slot as u64,
            UserData::Task { task_id, tag } => TASK_BIT | ((task_id as u64) << 32) | tag as u64,
            UserData::Wake => WAKE,
        }
    }

    #[inline]
    pub(crate) const fn decode(raw: u64) -> Self {
        if raw == WAKE {
            UserData::Wake
        } else if raw & TASK_BIT != 0 {
            UserData::Task {
                task_id: ((raw & !TASK_BIT) >> 32) as u32,
                tag: raw as u32,
            }
        } else {
            UserData::Device { slot: raw as u32 }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips() {
        let cases = [
            UserData::Wake,
            UserData::Device { slot: 0 },
            UserData::Device { slot: u32::MAX },
            UserData::Task { task_id: 0, tag: 0 },
            UserData::Task {
                task_id: 255,
                tag: u32::MAX,
            },
            UserData::Task {
                task_id: (1 << 31) - 2,
                tag: u32::MAX,
            },
        ];
        for c in cases {
            assert_eq!(UserData::decode(c.encode()), c, "{:#x}", c.encode());
        }
        // The encodings the ring has always used.
        assert_eq!(UserData::Wake.encode(), u64::MAX);
        assert_eq!(UserData::Device { slot: 7 }.encode(), 7);
        assert_eq!(
            UserData::Task { task_id: 3, tag: 9 }.encode(),
            (1 << 63) | (3 << 32) | 9
        );
    }
}
