//! The read planner: the requests that read one meter, and where each of its points is found in
//! their answers.
//!
//! A meter's points (valve and readings) are grouped by table, and points whose address ranges touch
//! or overlap share one request as long as it stays within [`Table::max_count`]. Invariants: points
//! that do not touch are never bridged (a gap may hold addresses the device refuses); every point has
//! exactly one slot, inside one block. Pure: no I/O; the bus task plans each meter once when it starts.

use crate::config::point::{PointSpec, Table};
use crate::config::MeterConfig;

/// One read request: `count` items of `table` from `address`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Block {
    pub(super) table: Table,
    /// First address.
    pub(super) address: u16,
    /// Items (bits or registers); at most [`Table::max_count`].
    pub(super) count: u16,
}

impl Block {
    fn end(&self) -> u32 {
        u32::from(self.address) + u32::from(self.count)
    }
}

/// Where a point's items sit in the planned blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Slot {
    /// Index into [`ReadPlan::blocks`].
    pub(super) block: usize,
    /// Offset of the point's first item inside that block.
    pub(super) offset: u16,
}

/// The requests that read one meter, and where each of its points is found in the answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReadPlan {
    /// Requests, ordered by table then address.
    pub(crate) blocks: Vec<Block>,
    pub(super) valve: Slot,
    /// One per [`MeterConfig::readings`], same order.
    pub(super) readings: Vec<Slot>,
}

/// Plan the reads of a meter: its points (valve and readings) grouped by table, and points whose address
/// ranges touch or overlap merged into one request, as long as the request stays within
/// [`Table::max_count`]. Points that do not touch are never bridged (a gap may hold addresses the device
/// refuses).
pub(crate) fn plan_reads(meter: &MeterConfig) -> ReadPlan {
    let points: Vec<&PointSpec> = std::iter::once(&meter.valve.point)
        .chain(meter.readings.iter().map(|r| &r.point))
        .collect();
    let (blocks, mut slots) = plan_points(&points);
    let valve = slots.remove(0);
    ReadPlan {
        blocks,
        valve,
        readings: slots,
    }
}

/// The planner proper: one slot per point, same order as `points` (non-empty).
fn plan_points(points: &[&PointSpec]) -> (Vec<Block>, Vec<Slot>) {
    let mut order: Vec<(usize, &PointSpec)> = points.iter().copied().enumerate().collect();
    order.sort_by_key(|(_, p)| (p.table, p.address, std::cmp::Reverse(p.count())));
    let mut blocks: Vec<Block> = Vec::new();
    let mut slots = vec![Slot { block: 0, offset: 0 }; points.len()];
    for (i, p) in order {
        let start = u32::from(p.address);
        let end = start + u32::from(p.count());
        let limit = u32::from(p.table.max_count());
        match blocks.last_mut() {
            // Sorted by address, so `start >= b.address`; merge when touching or overlapping.
            Some(b) if b.table == p.table && start <= b.end() && end.max(b.end()) - u32::from(b.address) <= limit => {
                // Fits in u16: bounded by `limit` (at most 2000).
                b.count = (end.max(b.end()) - u32::from(b.address)) as u16;
            }
            _ => blocks.push(Block {
                table: p.table,
                address: p.address,
                count: p.count(),
            }),
        }
        let block = blocks.len() - 1;
        slots[i] = Slot {
            block,
            offset: p.address - blocks[block].address,
        };
    }
    (blocks, slots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::point::{ByteOrder, ValueType, WordOrder};

    fn p(table: Table, address: u16, kind: ValueType) -> PointSpec {
        PointSpec {
            table,
            address,
            kind,
            word_order: WordOrder::Big,
            byte_order: ByteOrder::Big,
            scale: None,
            decimals: None,
        }
    }

    fn plan(points: &[PointSpec]) -> (Vec<Block>, Vec<Slot>) {
        let refs: Vec<&PointSpec> = points.iter().collect();
        plan_points(&refs)
    }

    fn block(table: Table, address: u16, count: u16) -> Block {
        Block { table, address, count }
    }

    #[test]
    fn points_that_touch_or_overlap_share_one_request() {
        use ValueType::*;
        // 0..2 (u32), 2 (u16) touches, 1 (u16) overlaps.
        let (blocks, slots) = plan(&[
            p(Table::Holding, 0, U32),
            p(Table::Holding, 2, U16),
            p(Table::Holding, 1, U16),
        ]);
        assert_eq!(blocks, [block(Table::Holding, 0, 3)]);
        assert_eq!(
            slots.iter().map(|s| (s.block, s.offset)).collect::<Vec<_>>(),
            [(0, 0), (0, 2), (0, 1)]
        );
    }

    #[test]
    fn a_gap_between_points_makes_two_requests() {
        let (blocks, slots) = plan(&[
            p(Table::Holding, 10, ValueType::U16),
            p(Table::Holding, 0, ValueType::U32),
        ]);
        assert_eq!(blocks, [block(Table::Holding, 0, 2), block(Table::Holding, 10, 1)]);
        assert_eq!(slots, [Slot { block: 1, offset: 0 }, Slot { block: 0, offset: 0 }]);
    }

    #[test]
    fn tables_are_never_mixed_and_come_in_table_order() {
        let (blocks, slots) = plan(&[
            p(Table::Input, 0, ValueType::U16),
            p(Table::Holding, 0, ValueType::U16),
            p(Table::Coil, 0, ValueType::U16),
            p(Table::Discrete, 1, ValueType::U16),
            p(Table::Coil, 1, ValueType::U16),
        ]);
        assert_eq!(
            blocks,
            [
                block(Table::Coil, 0, 2),
                block(Table::Discrete, 1, 1),
                block(Table::Holding, 0, 1),
                block(Table::Input, 0, 1),
            ]
        );
        assert_eq!(slots[0], Slot { block: 3, offset: 0 });
        assert_eq!(slots[4], Slot { block: 0, offset: 1 });
    }

    #[test]
    fn a_request_never_exceeds_the_table_limit() {
        // 125 registers is the most one read may ask for: a run of touching points covering 0..125
        // is one request, the touching point at 125 starts the next one.
        let mut points: Vec<PointSpec> = (0..31).map(|i| p(Table::Holding, i * 4, ValueType::U64)).collect();
        points.push(p(Table::Holding, 124, ValueType::U16));
        points.push(p(Table::Holding, 125, ValueType::U32));
        let (blocks, slots) = plan(&points);
        assert_eq!(blocks, [block(Table::Holding, 0, 125), block(Table::Holding, 125, 2)]);
        assert_eq!(slots[31], Slot { block: 0, offset: 124 });
        assert_eq!(slots[32], Slot { block: 1, offset: 0 });
        // Coils: 2000 bits.
        let bits: Vec<PointSpec> = (0..2001).map(|i| p(Table::Coil, i, ValueType::U16)).collect();
        let (blocks, _) = plan(&bits);
        assert_eq!(blocks, [block(Table::Coil, 0, 2000), block(Table::Coil, 2000, 1)]);
    }

    #[test]
    fn the_same_point_twice_is_read_once() {
        let (blocks, slots) = plan(&[p(Table::Coil, 5, ValueType::U16), p(Table::Coil, 5, ValueType::U16)]);
        assert_eq!(blocks, [block(Table::Coil, 5, 1)]);
        assert_eq!(slots, [Slot { block: 0, offset: 0 }; 2]);
    }

    #[test]
    fn points_at_the_top_of_the_address_space_do_not_overflow() {
        let (blocks, _) = plan(&[
            p(Table::Holding, 65532, ValueType::U64),
            p(Table::Holding, 65535, ValueType::U16),
        ]);
        assert_eq!(blocks, [block(Table::Holding, 65532, 4)]);
    }
}
