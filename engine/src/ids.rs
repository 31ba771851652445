//! Newtypes for identifiers and offsets, so a chunk index is never confused with a byte offset.

use std::fmt;

macro_rules! id_newtype {
    ($(#[$m:meta])* $name:ident($inner:ty)) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

id_newtype!(
    /// A volume, unique within one daemon.
    VolumeId(u32)
);
id_newtype!(
    /// A configured device (its slot in every reactor's device table).
    DeviceId(u32)
);
id_newtype!(
    /// A reactor: one thread, one core, one io_uring.
    ReactorId(u32)
);
id_newtype!(
    /// A chunk of a volume (volume offset / chunk size).
    ChunkIndex(u64)
);
id_newtype!(
    /// A chunk-sized slot of a device's data area.
    PhysChunk(u32)
);
