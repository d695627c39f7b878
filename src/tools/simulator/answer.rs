//! One request against the plant: how the simulated units answer it, decided under the plant's lock, so
//! the tables are read (or written) at once. The tables behave like a device's (an out-of-range read is
//! `IllegalDataAddress`, a count of 0 or over the limit `IllegalDataValue`, an unknown function
//! `IllegalFunction`); then a queued fault, or a flaky unit's draw, shapes the [`Answer`].
//!
//! Never: sends anything or waits: delays and garbling are carried out by `service.rs`.

use std::collections::VecDeque;
use std::time::Duration;

use rand::Rng as _;
use tokio_modbus::prelude::{ExceptionCode, Request, Response};

use super::{Fault, Plant, Unit};

/// How the service answers one request.
pub(super) enum Answer {
    /// Send nothing.
    Silent,
    /// Answer at once.
    Now(Result<Response, ExceptionCode>),
    /// Answer after a delay (function code of the request, for framing it on an RTU line).
    Late(Duration, u8, Result<Response, ExceptionCode>),
    /// Answer at once, garbled on the wire.
    Garbled(Result<Response, ExceptionCode>),
}

impl Plant {
    /// Decide the answer to one request: under the lock, so the tables are read (or written) at once.
    pub(super) fn answer(&self, slave: u8, request: Request<'_>) -> Answer {
        let mut p = self.lock();
        *p.requests.entry(slave).or_default() += 1;
        if p.silent.get(&slave).copied().unwrap_or(false) {
            return Answer::Silent;
        }
        // Two draws for every request, failing or not, so a seed always fails the same requests.
        let flaky = p.flaky.get_mut(&slave).and_then(|(f, rng)| {
            let (fail, late) = (rng.random::<f64>() < f.rate, rng.random::<bool>());
            fail.then_some(if late { f.late } else { None })
        });
        let fault = p.faults.get_mut(&slave).and_then(VecDeque::pop_front);
        let fault = match (fault, flaky) {
            (Some(f), _) => Some(f),
            (None, None) => None,
            (None, Some(late)) => {
                *p.flaky_failures.entry(slave).or_default() += 1;
                match late {
                    Some(d) => Some(Fault::Late(d)),
                    None => return Answer::Silent,
                }
            }
        };
        let Some(u) = p.units.get_mut(&slave) else {
            return Answer::Silent;
        };
        let fc = read_function(&request);
        let mut result = apply(u, request);
        match fault {
            None => Answer::Now(result),
            Some(Fault::Late(d)) => Answer::Late(d, fc, result),
            Some(Fault::Garbage) => Answer::Garbled(result),
            Some(Fault::WrongCount) => {
                if let Ok(Response::ReadCoils(v) | Response::ReadDiscreteInputs(v)) = &mut result {
                    v.pop();
                }
                if let Ok(Response::ReadHoldingRegisters(v) | Response::ReadInputRegisters(v)) = &mut result {
                    v.pop();
                }
                Answer::Now(result)
            }
        }
    }
}

/// The function code of a read request (0 for others).
fn read_function(request: &Request<'_>) -> u8 {
    match request {
        Request::ReadCoils(..) => 1,
        Request::ReadDiscreteInputs(..) => 2,
        Request::ReadHoldingRegisters(..) => 3,
        Request::ReadInputRegisters(..) => 4,
        _ => 0,
    }
}

/// Items `address..address + count` of a table, or the exception a device gives.
fn range<T: Clone>(table: &[T], address: u16, count: u16, max: u16) -> Result<Vec<T>, ExceptionCode> {
    if count == 0 || count > max {
        return Err(ExceptionCode::IllegalDataValue);
    }
    let start = usize::from(address);
    table
        .get(start..start + usize::from(count))
        .map(<[T]>::to_vec)
        .ok_or(ExceptionCode::IllegalDataAddress)
}

fn write<T: Clone>(table: &mut [T], address: u16, values: &[T]) -> Result<(), ExceptionCode> {
    let start = usize::from(address);
    let dst = table
        .get_mut(start..start + values.len())
        .ok_or(ExceptionCode::IllegalDataAddress)?;
    dst.clone_from_slice(values);
    Ok(())
}

/// Run one request against a unit's tables.
fn apply(u: &mut Unit, request: Request<'_>) -> Result<Response, ExceptionCode> {
    Ok(match request {
        Request::ReadCoils(a, n) => Response::ReadCoils(range(&u.coils, a, n, 2000)?),
        Request::ReadDiscreteInputs(a, n) => Response::ReadDiscreteInputs(range(&u.discrete, a, n, 2000)?),
        Request::ReadHoldingRegisters(a, n) => Response::ReadHoldingRegisters(range(&u.holding, a, n, 125)?),
        Request::ReadInputRegisters(a, n) => Response::ReadInputRegisters(range(&u.input, a, n, 125)?),
        Request::WriteSingleCoil(a, v) => {
            write(&mut u.coils, a, &[v])?;
            Response::WriteSingleCoil(a, v)
        }
        Request::WriteSingleRegister(a, v) => {
            write(&mut u.holding, a, &[v])?;
            Response::WriteSingleRegister(a, v)
        }
        Request::WriteMultipleCoils(a, vs) => {
            write(&mut u.coils, a, &vs)?;
            Response::WriteMultipleCoils(a, vs.len() as u16)
        }
        Request::WriteMultipleRegisters(a, vs) => {
            write(&mut u.holding, a, &vs)?;
            Response::WriteMultipleRegisters(a, vs.len() as u16)
        }
        _ => return Err(ExceptionCode::IllegalFunction),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::simulator::Flaky;

    #[test]
    fn out_of_range_reads_are_exceptions_and_unknown_units_are_silent() {
        let p = Plant::with_meters(1);
        assert!(matches!(
            p.answer(1, Request::ReadHoldingRegisters(63, 2)),
            Answer::Now(Err(ExceptionCode::IllegalDataAddress))
        ));
        assert!(matches!(
            p.answer(1, Request::ReadHoldingRegisters(0, 0)),
            Answer::Now(Err(ExceptionCode::IllegalDataValue))
        ));
        assert!(matches!(p.answer(7, Request::ReadCoils(0, 1)), Answer::Silent));
        p.silence(1, true);
        assert!(matches!(p.answer(1, Request::ReadCoils(0, 1)), Answer::Silent));
    }

    #[test]
    fn faults_are_consumed_one_per_request() {
        let p = Plant::with_meters(1);
        p.inject(1, Fault::WrongCount);
        p.inject(1, Fault::Garbage);
        assert!(matches!(
            p.answer(1, Request::ReadHoldingRegisters(0, 3)),
            Answer::Now(Ok(Response::ReadHoldingRegisters(v))) if v.len() == 2
        ));
        assert!(matches!(p.answer(1, Request::ReadCoils(0, 1)), Answer::Garbled(Ok(_))));
        assert!(matches!(p.answer(1, Request::ReadCoils(0, 1)), Answer::Now(Ok(_))));
        assert_eq!(p.pending_faults(1), 0);
        assert_eq!(p.requests(1), 3);
    }

    /// The kind of each of `n` answers of `unit`: 'n' now, 'l' late (after `late`), 's' silent.
    fn pattern(p: &Plant, unit: u8, n: usize, late: Duration) -> String {
        (0..n)
            .map(|_| match p.answer(unit, Request::ReadHoldingRegisters(0, 4)) {
                Answer::Now(Ok(_)) => 'n',
                Answer::Late(d, 3, Ok(_)) if d == late => 'l',
                Answer::Silent => 's',
                _ => '?',
            })
            .collect()
    }

    #[test]
    fn a_flaky_unit_fails_a_share_of_requests_the_same_way_for_the_same_seed() {
        let late = Duration::from_millis(80);
        let flaky = Flaky {
            rate: 0.25,
            late: Some(late),
            seed: 7,
        };
        let (a, b) = (Plant::with_meters(2), Plant::with_meters(2));
        a.set_flaky(1, Some(flaky));
        b.set_flaky(1, Some(flaky));
        let pa = pattern(&a, 1, 400, late);
        assert_eq!(pa, pattern(&b, 1, 400, late), "same seed, same failures");
        let failed = pa.chars().filter(|c| *c != 'n').count();
        assert!((60..=140).contains(&failed), "about 25 % of 400: {failed}");
        assert!(pa.contains('l') && pa.contains('s') && !pa.contains('?'), "{pa}");
        assert_eq!(a.flaky_failures(1), failed as u64);
        assert_eq!(a.status()[0].flaky_percent, 25.0);
        // Other units, and the same unit once it is no longer flaky, answer every request.
        assert_eq!(pattern(&a, 2, 50, late), "n".repeat(50));
        a.set_flaky(1, None);
        assert_eq!(pattern(&a, 1, 50, late), "n".repeat(50));
        // A queued fault comes first; the draws go on underneath it.
        b.inject(1, Fault::WrongCount);
        assert!(matches!(
            b.answer(1, Request::ReadHoldingRegisters(0, 4)),
            Answer::Now(Ok(Response::ReadHoldingRegisters(v))) if v.len() == 3
        ));
    }
}
