//! The checks of a request against its export, as one flat list in the order they apply (as
//! nbdkit's `validate_request`): pure, so every check has its rows in the table below.

use super::super::ExportInfo;
use super::wire::{self, Command};

/// Flags the protocol defines; any other bit is refused.
const KNOWN_FLAGS: u16 = wire::CMD_FLAG_FUA
    | wire::CMD_FLAG_NO_HOLE
    | wire::CMD_FLAG_DF
    | wire::CMD_FLAG_REQ_ONE
    | wire::CMD_FLAG_FAST_ZERO
    | wire::CMD_FLAG_PAYLOAD_LEN;

/// Check a request for `cmd` against `export`, whose volume holds `size_bytes` now. `Err` is
/// the NBD errno to reply with; the first failing check decides it.
pub(super) fn validate(
    req: &wire::Request,
    cmd: Command,
    export: &ExportInfo,
    size_bytes: u64,
) -> Result<(), u32> {
    let writes = matches!(cmd, Command::Write | Command::Trim | Command::WriteZeroes);
    let ranged = matches!(
        cmd,
        Command::Read
            | Command::Write
            | Command::Trim
            | Command::WriteZeroes
            | Command::Cache
            | Command::BlockStatus
    );
    let aligned = matches!(
        cmd,
        Command::Read | Command::Write | Command::Trim | Command::WriteZeroes | Command::Cache
    );
    let no_hole = req.flags & wire::CMD_FLAG_NO_HOLE != 0;

    // 1. Only flags the protocol defines.
    if req.flags & !KNOWN_FLAGS != 0 {
        return Err(wire::EINVAL);
    }
    // 2. Nothing that changes data on a read-only export.
    if writes && export.read_only {
        return Err(wire::EPERM);
    }
    // Commands without a range (FLUSH, DISC, RESIZE) need nothing more.
    if !ranged {
        return Ok(());
    }
    // 3. A range is never empty.
    if req.length == 0 {
        return Err(wire::EINVAL);
    }
    // 4. It lies inside the export (a write past the end is out of space).
    if req
        .offset
        .checked_add(req.length)
        .is_none_or(|end| end > size_bytes)
    {
        return Err(if writes { wire::ENOSPC } else { wire::EINVAL });
    }
    // 5. Offset and length are multiples of the minimum block size (not for BLOCK_STATUS).
    let min = u64::from(export.min_block_bytes.max(1));
    if aligned && (!req.offset.is_multiple_of(min) || !req.length.is_multiple_of(min)) {
        return Err(wire::EINVAL);
    }
    // 6. A READ or WRITE carries at most the maximum block size (a DF read that cannot fit
    //    one chunk overflows).
    if matches!(cmd, Command::Read | Command::Write)
        && req.length > u64::from(export.max_block_bytes)
    {
        let df_read = cmd == Command::Read && req.flags & wire::CMD_FLAG_DF != 0;
        return Err(if df_read {
            wire::EOVERFLOW
        } else {
            wire::EINVAL
        });
    }
    // 7. WRITE_ZEROES with NO_HOLE writes zeros: never fast, and a buffer of at most the
    //    maximum block size.
    if cmd == Command::WriteZeroes && no_hole {
        if req.flags & wire::CMD_FLAG_FAST_ZERO != 0 {
            return Err(wire::ENOTSUP);
        }
        if req.length > u64::from(export.max_block_bytes) {
            return Err(wire::EINVAL);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 1 << 20;
    const MIN: u32 = 512;
    const MAX: u32 = 64 << 10;

    fn export(read_only: bool) -> ExportInfo {
        ExportInfo {
            name: "v".into(),
            description: String::new(),
            size_bytes: SIZE,
            read_only,
            min_block_bytes: MIN,
            preferred_block_bytes: 4096,
            max_block_bytes: MAX,
        }
    }

    const RW: bool = false;
    const RO: bool = true;
    const FUA: u16 = wire::CMD_FLAG_FUA;
    const DF: u16 = wire::CMD_FLAG_DF;
    const NO_HOLE: u16 = wire::CMD_FLAG_NO_HOLE;
    const FAST_ZERO: u16 = wire::CMD_FLAG_FAST_ZERO;
    const MAX64: u64 = MAX as u64;

    /// (what the row shows, command, flags, offset, length, read-only export, expected)
    type Row = (&'static str, Command, u16, u64, u64, bool, Result<(), u32>);

    #[rustfmt::skip]
    const ROWS: &[Row] = &[
        // accepted
        ("read", Command::Read, 0, 0, 4096, RW, Ok(())),
        ("read up to the end", Command::Read, 0, SIZE - 512, 512, RW, Ok(())),
        ("read of the max size", Command::Read, DF, 0, MAX64, RW, Ok(())),
        ("fua write", Command::Write, FUA, 4096, 4096, RW, Ok(())),
        ("read on a read-only export", Command::Read, 0, 0, 512, RO, Ok(())),
        ("flush on a read-only export", Command::Flush, 0, 0, 0, RO, Ok(())),
        ("flush has no range", Command::Flush, 0, u64::MAX, 0, RW, Ok(())),
        ("disc has no range", Command::Disc, 0, 7, 3, RW, Ok(())),
        ("trim longer than the max", Command::Trim, 0, 0, SIZE, RW, Ok(())),
        ("block status unaligned", Command::BlockStatus, 0, 1, 3, RW, Ok(())),
        ("cache", Command::Cache, 0, 0, 4096, RW, Ok(())),
        ("zeroes, fast, may punch", Command::WriteZeroes, FAST_ZERO, 0, SIZE, RW, Ok(())),
        ("zeroes, no hole, up to the max", Command::WriteZeroes, NO_HOLE, 0, MAX64, RW, Ok(())),
        // 1. flags
        ("unknown flag", Command::Read, 1 << 6, 0, 512, RW, Err(wire::EINVAL)),
        ("unknown flag without a range", Command::Flush, 1 << 15, 0, 0, RW, Err(wire::EINVAL)),
        ("flags before read-only", Command::Write, 1 << 6, 0, 512, RO, Err(wire::EINVAL)),
        // 2. read-only
        ("write read-only", Command::Write, 0, 0, 512, RO, Err(wire::EPERM)),
        ("trim read-only", Command::Trim, 0, 0, 512, RO, Err(wire::EPERM)),
        ("zeroes read-only", Command::WriteZeroes, 0, 0, 512, RO, Err(wire::EPERM)),
        ("read-only before bounds", Command::Write, 0, SIZE, 512, RO, Err(wire::EPERM)),
        // 3. empty range
        ("empty read", Command::Read, 0, 0, 0, RW, Err(wire::EINVAL)),
        ("empty write", Command::Write, 0, 0, 0, RW, Err(wire::EINVAL)),
        ("empty block status", Command::BlockStatus, 0, 0, 0, RW, Err(wire::EINVAL)),
        // 4. bounds
        ("read past the end", Command::Read, 0, SIZE - 512, 1024, RW, Err(wire::EINVAL)),
        ("write past the end", Command::Write, 0, SIZE, 512, RW, Err(wire::ENOSPC)),
        ("trim past the end", Command::Trim, 0, 0, SIZE + 512, RW, Err(wire::ENOSPC)),
        ("zeroes past the end", Command::WriteZeroes, 0, SIZE, 512, RW, Err(wire::ENOSPC)),
        ("cache past the end", Command::Cache, 0, SIZE, 512, RW, Err(wire::EINVAL)),
        ("block status past the end", Command::BlockStatus, 0, SIZE, 1, RW, Err(wire::EINVAL)),
        ("offset + length overflows", Command::Write, 0, u64::MAX - 511, 1024, RW, Err(wire::ENOSPC)),
        ("bounds before alignment", Command::Read, 0, SIZE + 1, 512, RW, Err(wire::EINVAL)),
        // 5. alignment
        ("read offset unaligned", Command::Read, 0, 1, 512, RW, Err(wire::EINVAL)),
        ("write length unaligned", Command::Write, 0, 0, 513, RW, Err(wire::EINVAL)),
        ("trim unaligned", Command::Trim, 0, 256, 512, RW, Err(wire::EINVAL)),
        ("zeroes unaligned", Command::WriteZeroes, 0, 0, 100, RW, Err(wire::EINVAL)),
        ("cache unaligned", Command::Cache, 0, 0, 100, RW, Err(wire::EINVAL)),
        // 6. max length
        ("read over the max", Command::Read, 0, 0, MAX64 + 512, RW, Err(wire::EINVAL)),
        ("df read over the max", Command::Read, DF, 0, MAX64 + 512, RW, Err(wire::EOVERFLOW)),
        ("write over the max", Command::Write, 0, 0, MAX64 + 512, RW, Err(wire::EINVAL)),
        ("df write over the max", Command::Write, DF, 0, MAX64 + 512, RW, Err(wire::EINVAL)),
        // 7. write zeroes without holes
        ("zeroes, no hole, fast", Command::WriteZeroes, NO_HOLE | FAST_ZERO, 0, 512, RW, Err(wire::ENOTSUP)),
        ("zeroes, no hole, over the max", Command::WriteZeroes, NO_HOLE, 0, MAX64 + 512, RW, Err(wire::EINVAL)),
        ("fast before the max", Command::WriteZeroes, NO_HOLE | FAST_ZERO, 0, SIZE, RW, Err(wire::ENOTSUP)),
    ];

    #[test]
    fn every_check_refuses_and_accepts_as_its_row_says() {
        for &(what, cmd, flags, offset, length, read_only, expected) in ROWS {
            let req = wire::Request {
                flags,
                kind: cmd.raw(),
                cookie: 1,
                offset,
                length,
            };
            assert_eq!(
                validate(&req, cmd, &export(read_only), SIZE),
                expected,
                "{what}: {cmd:?} flags {flags:#x} offset {offset} length {length}"
            );
        }
    }

    #[test]
    fn the_size_now_bounds_the_range_not_the_negotiated_one() {
        let req = wire::Request {
            kind: Command::Read.raw(),
            offset: SIZE,
            length: 512,
            ..Default::default()
        };
        assert_eq!(
            validate(&req, Command::Read, &export(RW), SIZE + 512),
            Ok(())
        );
        assert_eq!(
            validate(&req, Command::Read, &export(RW), SIZE),
            Err(wire::EINVAL)
        );
    }
}
