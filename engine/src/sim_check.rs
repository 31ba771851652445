//! How the seeded simulation tests check data: each sector a write puts down names the write
//! and the sector (so a read shows which write it came from, and torn or misplaced bytes do
//! not decode), and a per-sector log of the values a read may return.

/// Fill `out` (one sector) with write `value`'s contents for absolute sector `s`.
pub fn fill_sector(out: &mut [u8], value: u64, s: u64) {
    debug_assert!(out.len() >= 16, "a sector holds the value and its number");
    out[..8].copy_from_slice(&value.to_le_bytes());
    out[8..16].copy_from_slice(&s.to_le_bytes());
    let mut x = value.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ s;
    for b in out[16..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
    }
}

/// The write sector `s` came from (0: zeros), or what is wrong with it.
pub fn decode_sector(data: &[u8], s: u64) -> Result<u64, String> {
    if data.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    if data.len() < 16 {
        return Err(format!("sector {s} is {} bytes", data.len()));
    }
    let mut header = [0u8; 8];
    header.copy_from_slice(&data[..8]);
    let value = u64::from_le_bytes(header);
    let mut expect = vec![0u8; data.len()];
    fill_sector(&mut expect, value, s);
    if expect == data {
        Ok(value)
    } else {
        Err(format!(
            "sector {s} holds bytes no write produced (header value {value})"
        ))
    }
}

/// One sector's values since the last one known durable: `vals[0]` is durable (or replaced
/// by a later one); `acked` is the absolute index of the last acknowledged value, and values
/// after it were submitted and not (yet) acknowledged. Indices are absolute:
/// `vals[i - base]` is the sector's `i`th value.
#[derive(Clone, Debug)]
pub struct SectorLog {
    pub base: u64,
    pub vals: Vec<u64>,
    pub acked: u64,
}

impl SectorLog {
    /// A sector known to hold `v`.
    pub fn new(v: u64) -> SectorLog {
        SectorLog {
            base: 0,
            vals: vec![v],
            acked: 0,
        }
    }

    /// A write of `value` was submitted.
    pub fn push(&mut self, value: u64) {
        self.vals.push(value);
    }

    /// The newest value submitted is acknowledged.
    pub fn ack_newest(&mut self) {
        self.acked = self.base + self.vals.len() as u64 - 1;
    }

    /// The last acknowledged value.
    pub fn acked_value(&self) -> u64 {
        self.vals[(self.acked - self.base) as usize]
    }

    /// What a read may return now: the last acknowledged value or a later one.
    pub fn readable(&self) -> &[u64] {
        &self.vals[(self.acked - self.base) as usize..]
    }

    /// Everything up to absolute index `i` is durable: forget what came before it.
    pub fn durable_from(&mut self, i: u64) {
        if i > self.base {
            self.vals.drain(..(i - self.base) as usize);
            self.base = i;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sectors_decode_to_their_write_and_nothing_else_does() {
        let mut a = vec![0u8; 512];
        fill_sector(&mut a, 7, 3);
        assert_eq!(decode_sector(&a, 3), Ok(7));
        assert!(decode_sector(&a, 4).is_err(), "a sector in the wrong place");
        a[100] ^= 1;
        assert!(decode_sector(&a, 3).is_err(), "a torn sector");
        assert_eq!(decode_sector(&[0u8; 512], 9), Ok(0));
    }

    #[test]
    fn the_log_keeps_what_a_read_may_return() {
        let mut log = SectorLog::new(0);
        log.push(1);
        log.push(2);
        assert_eq!(log.readable(), &[0, 1, 2]);
        log.ack_newest();
        assert_eq!((log.acked_value(), log.readable()), (2, &[2][..]));
        log.durable_from(2);
        assert_eq!((log.base, log.vals.as_slice()), (2, &[2][..]));
    }
}
