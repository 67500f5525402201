//! RFC 3339 timestamps for glob results, without a date-time dependency.

use std::time::{SystemTime, UNIX_EPOCH};

/// `2024-05-06T07:08:09.123456+00:00`: UTC, microseconds, and a numeric offset rather than
/// `Z`, because that is the form every client parser accepts (Python < 3.11 rejects `Z`).
pub fn rfc3339(time: SystemTime) -> String {
    let (seconds, micros) = match time.duration_since(UNIX_EPOCH) {
        Ok(since) => (since.as_secs() as i64, since.subsec_micros()),
        // Before 1970: step back one whole second and count the fraction forwards.
        Err(error) => {
            let before = error.duration();
            let whole = before.as_secs() as i64 + i64::from(before.subsec_nanos() > 0);
            let micros = (whole as u128 * 1_000_000 - before.as_micros()) as u32;
            (-whole, micros)
        }
    };
    let days = seconds.div_euclid(86_400);
    let second_of_day = seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}+00:00",
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60,
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u32;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(seconds: u64, micros: u32) -> String {
        rfc3339(UNIX_EPOCH + Duration::new(seconds, micros * 1000))
    }

    #[test]
    fn known_instants() {
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000+00:00");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.000005+00:00");
        assert_eq!(
            at(1_700_000_000, 123_456),
            "2023-11-14T22:13:20.123456+00:00"
        );
        assert_eq!(
            at(4_102_444_799, 999_999),
            "2099-12-31T23:59:59.999999+00:00"
        );
    }

    #[test]
    fn before_the_epoch() {
        let half_second_before = UNIX_EPOCH - Duration::from_millis(500);
        assert_eq!(
            rfc3339(half_second_before),
            "1969-12-31T23:59:59.500000+00:00"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_secs(86_400)),
            "1969-12-31T00:00:00.000000+00:00"
        );
    }
}
