//! The IOAPIC: register-select and window accesses of any width and value (and anywhere in
//! its page), redirection-entry reads back as MSIs, EOIs and resets.

use devices::{ChangedPins, Ioapic};

use crate::Input;

/// Runs one fuzz input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mut ioapic = Ioapic::new(input.u8());
    let mut sink = ChangedPins::default();
    let mut ops = 0;
    while !input.is_empty() && ops < 512 {
        ops += 1;
        match input.u8() % 8 {
            0 | 1 => {
                // Select a register (usually a real one).
                let reg = if input.u8() % 8 == 0 {
                    input.u32()
                } else {
                    u32::from(input.u8() % 0x40)
                };
                ioapic.write(0, &reg.to_le_bytes(), &mut sink);
            }
            2 | 3 => {
                let v = input.u32().to_le_bytes();
                ioapic.write(0x10, &v, &mut sink);
            }
            4 => {
                let off = u64::from(input.u16()) % 0x1010;
                let n = input.width();
                let v = input.u64().to_le_bytes();
                let mut data = v.to_vec();
                data.resize(n, 0);
                ioapic.write(off, &data, &mut sink);
            }
            5 => {
                let off = if input.bool() {
                    0x10
                } else {
                    u64::from(input.u16()) % 0x1010
                };
                let mut out = vec![0u8; input.width()];
                ioapic.read(off, &mut out);
            }
            6 => {
                let pin = usize::from(input.u8() % 32);
                let _ = ioapic.pin_msi(pin);
                let _ = ioapic.redirection_entry(pin);
                ioapic.end_of_interrupt(input.u8());
            }
            _ => {
                if input.u8() % 16 == 0 {
                    ioapic.reset(&mut sink);
                }
                sink = ChangedPins::default();
            }
        }
    }
}
