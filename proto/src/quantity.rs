//! Kubernetes resource quantities: memory (`128Mi`, `1G`, `5e8`) as byte counts, CPU
//! (`500m`, `1`, `1.5`) as thousandths of a core.

use thiserror::Error;

/// A quantity string that is not a valid byte count.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid quantity {value:?}: {reason}")]
pub struct QuantityError {
    pub value: String,
    pub reason: &'static str,
}

/// Parses a Kubernetes quantity into bytes. Accepts the binary suffixes (Ki, Mi, Gi, Ti,
/// Pi, Ei), the decimal ones (k, M, G, T, P, E), an exponent (`5e8`) and plain integers.
/// Fractions are allowed where the result is whole (`1.5Gi`); milli (`m`) is refused
/// because a fraction of a byte means nothing.
pub fn parse_bytes(value: &str) -> Result<u64, QuantityError> {
    let err = |reason| QuantityError {
        value: value.to_string(),
        reason,
    };
    let s = value.trim();
    if s.is_empty() {
        return Err(err("empty"));
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    if number.is_empty() || number.matches('.').count() > 1 {
        return Err(err("expected a number"));
    }
    let multiplier: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "m" => return Err(err("milli units make no sense for bytes")),
        e if e.starts_with(['e', 'E']) => {
            let exp: i32 = e[1..].parse().map_err(|_| err("bad exponent"))?;
            if !(0..=18).contains(&exp) {
                return Err(err("exponent out of range"));
            }
            10f64.powi(exp)
        }
        _ => return Err(err("unknown suffix")),
    };
    let n: f64 = number.parse().map_err(|_| err("expected a number"))?;
    let bytes = n * multiplier;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(err("out of range"));
    }
    if bytes.fract() != 0.0 {
        return Err(err("not a whole number of bytes"));
    }
    Ok(bytes as u64)
}

/// Parses a CPU quantity into millicores: `250m`, `1`, `0.5`, `2.25`. Anything finer than a
/// millicore, or negative, is refused (the API server rounds; Brink says so instead).
pub fn parse_cpu_millis(value: &str) -> Result<u64, QuantityError> {
    let err = |reason| QuantityError {
        value: value.to_string(),
        reason,
    };
    let s = value.trim();
    let (number, scale) = match s.strip_suffix('m') {
        Some(n) => (n, 1.0),
        None => (s, 1000.0),
    };
    if number.is_empty()
        || !number.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        || number.matches('.').count() > 1
    {
        return Err(err("expected a number of cores or millicores (500m)"));
    }
    let n: f64 = number.parse().map_err(|_| err("expected a number"))?;
    let millis = n * scale;
    if !millis.is_finite() || millis > 1e12 {
        return Err(err("out of range"));
    }
    if millis.fract() != 0.0 {
        return Err(err("finer than a millicore"));
    }
    Ok(millis as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_forms_kubernetes_users_write() {
        assert_eq!(parse_bytes("128Mi"), Ok(128 << 20));
        assert_eq!(parse_bytes("1Gi"), Ok(1 << 30));
        assert_eq!(parse_bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_bytes("500M"), Ok(500_000_000));
        assert_eq!(parse_bytes("5e8"), Ok(500_000_000));
        assert_eq!(parse_bytes("4096"), Ok(4096));
    }

    #[test]
    fn cpu_quantities_are_millicores() {
        assert_eq!(parse_cpu_millis("500m"), Ok(500));
        assert_eq!(parse_cpu_millis("1"), Ok(1000));
        assert_eq!(parse_cpu_millis("0.25"), Ok(250));
        assert_eq!(parse_cpu_millis("2.5"), Ok(2500));
        for bad in [
            "", "m", "-1", "0.0001", "1.2.3", "1Gi", "1e3", "abc", "1e999",
        ] {
            assert!(parse_cpu_millis(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn refuses_garbage() {
        for bad in [
            "", "Mi", "12Xi", "1.2.3", "-5Mi", "100m", "1e99", "0.5", "abc", "1e",
        ] {
            assert!(parse_bytes(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
