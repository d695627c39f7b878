//! Point definitions: where a value sits in a Modbus table and how its registers are laid out, as the
//! configuration describes it. Decoding the registers read from a device is `crate::modbus::point`.

use std::fmt;

/// A Modbus table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// Read coils (fc 1).
    Coil,
    /// Read discrete inputs (fc 2).
    Discrete,
    /// Read holding registers (fc 3).
    Holding,
    /// Read input registers (fc 4).
    Input,
}

impl Table {
    /// Coils and discrete inputs hold bits, the others 16-bit registers.
    pub(crate) fn is_bit(self) -> bool {
        matches!(self, Table::Coil | Table::Discrete)
    }

    /// The most items one read request may ask for (Modbus application protocol limits).
    pub(crate) fn max_count(self) -> u16 {
        if self.is_bit() {
            2000
        } else {
            125
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Table::Coil => "coil",
            Table::Discrete => "discrete",
            Table::Holding => "holding",
            Table::Input => "input",
        })
    }
}

/// How the registers of a value are interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    /// One register, unsigned.
    U16,
    /// One register, two's complement.
    I16,
    /// Two registers, unsigned.
    U32,
    /// Two registers, two's complement.
    I32,
    /// Two registers, IEEE 754 single.
    F32,
    /// Four registers, unsigned.
    U64,
    /// Four registers, IEEE 754 double.
    F64,
}

impl ValueType {
    /// Registers the type spans.
    pub(crate) fn registers(self) -> u16 {
        match self {
            ValueType::U16 | ValueType::I16 => 1,
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 2,
            ValueType::U64 | ValueType::F64 => 4,
        }
    }
}

/// Order of the 16-bit words of a multi-register value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WordOrder {
    /// High word first (the default).
    Big,
    /// Low word first.
    Little,
}

/// Order of the two bytes inside each register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteOrder {
    /// High byte first (the Modbus default).
    Big,
    /// Low byte first (swapped).
    Little,
}

/// Where a value is and how to read it.
#[derive(Debug, Clone, PartialEq)]
pub struct PointSpec {
    /// The table.
    pub table: Table,
    /// First address (0-based protocol address).
    pub(crate) address: u16,
    /// Register type (ignored for bit tables).
    pub kind: ValueType,
    /// Word order for multi-register types.
    pub word_order: WordOrder,
    /// Byte order within each register.
    pub(crate) byte_order: ByteOrder,
    /// Multiplier applied to the raw value.
    pub scale: Option<f64>,
    /// Decimals in the rendered string; default: as many as `scale` has.
    pub(crate) decimals: Option<u32>,
}

impl PointSpec {
    /// Items (bits or registers) the point spans.
    pub(crate) fn count(&self) -> u16 {
        if self.table.is_bit() {
            1
        } else {
            self.kind.registers()
        }
    }

    pub(crate) fn render_decimals(&self) -> Option<u32> {
        self.decimals.or_else(|| self.scale.map(decimals_of))
    }
}

/// Decimals a scale implies: 0.01 → 2, 0.5 → 1, 10 → 0.
pub(crate) fn decimals_of(scale: f64) -> u32 {
    let s = format!("{}", scale.abs());
    match s.split_once('.') {
        Some((_, frac)) => frac.len().min(12) as u32,
        None => 0,
    }
}
