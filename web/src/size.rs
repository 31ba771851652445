//! Sizes as people write them: `10G`, `512M`, `1.5T`, `4096`, `64KiB` (binary multiples).

/// Parse a size. Suffixes K, M, G, T, P (optionally followed by `i`, `B` or `iB`, any case)
/// are powers of 1024; no suffix means bytes. Fractions are allowed with a suffix (`1.5G`)
/// when the result is a whole number of bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let bad = || {
        format!(
            "size {text:?}: expected a number of bytes or a number with K, M, G, T or P (e.g. 10G)"
        )
    };
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(bad());
    }
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b'))
        .or_else(|| unit.strip_suffix('i'))
        .unwrap_or(&unit);
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        _ => return Err(bad()),
    };
    match num.split_once('.') {
        None => {
            let n: u64 = num.parse().map_err(|_| bad())?;
            n.checked_mul(1u64 << shift)
                .ok_or_else(|| format!("size {text:?} is too large"))
        }
        Some((whole, frac)) => {
            if frac.is_empty() || frac.len() > 9 || whole.is_empty() {
                return Err(bad());
            }
            let whole: u128 = whole.parse().map_err(|_| bad())?;
            let frac_n: u128 = frac.parse().map_err(|_| bad())?;
            let scale = 10u128.pow(frac.len() as u32);
            let unit = 1u128 << shift;
            let total = whole * unit * scale + frac_n * unit;
            if !total.is_multiple_of(scale) {
                return Err(format!("size {text:?} is not a whole number of bytes"));
            }
            u64::try_from(total / scale).map_err(|_| format!("size {text:?} is too large"))
        }
    }
}

/// `1073741824` → `1 GiB`, `1610612736` → `1.5 GiB`, `1000` → `1000 B`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else if (v - v.round()).abs() < 0.005 {
        format!("{:.0} {}", v, UNITS[i])
    } else {
        format!("{:.2} {}", v, UNITS[i])
            .replace(".00 ", " ")
            .replace("0 ", " ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("10g"), Ok(10 << 30));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("10GB"), Ok(10 << 30));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size(" 512 M "), Ok(512 << 20));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("10X").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("1.5").is_err(), "half a byte");
        assert!(parse_size("99999999P").is_err());
        assert_eq!(format_size(1 << 30), "1 GiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
        assert_eq!(format_size(1000), "1000 B");
    }
}
