//! The i8042 keyboard controller, only as far as a guest uses it to reset the machine.

use super::{IoAction, PioDevice};

/// Data port.
pub const DATA_PORT: u16 = 0x60;
/// Command/status port.
pub const COMMAND_PORT: u16 = 0x64;
/// The "pulse reset line" command.
const CMD_RESET: u8 = 0xfe;

/// Minimal i8042: status reads as "empty", command 0xFE resets.
#[derive(Default)]
pub struct I8042;

impl PioDevice for I8042 {
    fn pio_read(&mut self, _port: u16, data: &mut [u8]) {
        // Status and data read as zero: no input pending, controller ready for commands.
        data.fill(0);
    }

    fn pio_write(&mut self, port: u16, data: &[u8]) -> IoAction {
        if port == COMMAND_PORT && data.first() == Some(&CMD_RESET) {
            IoAction::Reset
        } else {
            IoAction::Continue
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_resets() {
        let mut k = I8042;
        assert_eq!(k.pio_write(COMMAND_PORT, &[0xfe]), IoAction::Reset);
        assert_eq!(k.pio_write(COMMAND_PORT, &[0xad]), IoAction::Continue);
        assert_eq!(k.pio_write(DATA_PORT, &[0xfe]), IoAction::Continue);
    }
}
