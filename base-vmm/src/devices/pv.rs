//! spanguest's paravirtual ports (see docs/spanguest-abi.md): identification, sleep, TSC
//! frequency, power-off, mailbox registration, the exit-storm target and the console line.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{le_value, lock, IoAction, PioDevice, SharedDevice};
use crate::memory::GuestRam;

/// First port of the device.
pub const PV_BASE: u16 = 0x0ac0;
/// Ports taken. The exit-storm port right after them is left unowned so that a service can
/// claim it (the per-event dispatch benchmark); unclaimed, its writes just exit.
pub const PV_LEN: u16 = 0x10;
/// `in`: identification; reads [`PV_MAGIC`].
pub const PORT_ID: u16 = 0x0ac0;
/// `out`: sleep for N µs; `in`: TSC kHz.
pub const PORT_SLEEP: u16 = 0x0ac4;
/// `out`: power off with the given status.
pub const PORT_POWER_OFF: u16 = 0x0ac8;
/// `out`: register the guest's mailbox page.
pub const PORT_MAILBOX: u16 = 0x0acc;
/// `out`: does nothing but exit (not owned by this device, see [`PV_LEN`]).
pub const PORT_EXIT_STORM: u16 = 0x0ad0;
/// First port of the secret-region registration pair (after the exit-storm port).
pub const PV_SECRET_BASE: u16 = 0x0ad8;
/// Ports of the secret-region registration pair.
pub const PV_SECRET_LEN: u16 = 8;
/// `out`: first page number (GPA / 4096) of a secret region.
pub const PORT_SECRET_PAGE: u16 = 0x0ad8;
/// `out`: number of pages; registers the region `[page, page + count)` as secret.
pub const PORT_SECRET_PAGES: u16 = 0x0adc;
/// `out`: guest-physical address of a console line (a little-endian u16 length, then the
/// bytes), written to the serial port's output in one exit instead of one exit per byte.
pub const PORT_CONSOLE_LINE: u16 = 0x0ad4;
/// Longest console line taken in one exit; longer ones are cut.
pub const MAX_CONSOLE_LINE: usize = 1024;
/// Most secret regions a guest may register.
const MAX_SECRETS: usize = 64;
/// "SPAN" read as a little-endian u32.
pub const PV_MAGIC: u32 = 0x4e41_5053;
/// Longest sleep a guest may ask for in one exit; longer requests are clipped.
const MAX_SLEEP: Duration = Duration::from_secs(1);

/// Mailbox commands (docs/spanguest-abi.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestCommand {
    /// Re-check every page the guest wrote.
    Verify = 1,
    /// Reset the guest's largest-stall counter.
    ResetStall = 2,
    /// Print `done` and power off.
    PowerOff = 3,
}

/// The device's state, saved and restored with the VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PvState {
    /// Guest-physical address of the guest's mailbox page, once registered.
    pub mailbox: Option<u64>,
    /// Sequence number of the last command posted to the mailbox.
    pub command_seq: u64,
    /// Secret regions the guest registered, `(gpa, len)`: left out of snapshots.
    #[serde(default)]
    pub secrets: Vec<(u64, u64)>,
    /// First page of the secret region being registered.
    #[serde(default)]
    pub secret_page: u64,
}

/// spanguest's paravirtual device.
pub struct PvDevice {
    tsc_khz: u32,
    /// Saved and restored state.
    pub state: PvState,
}

impl PvDevice {
    /// A device reporting `tsc_khz` to the guest.
    pub fn new(tsc_khz: u32, state: PvState) -> Self {
        PvDevice { tsc_khz, state }
    }
}

impl PioDevice for PvDevice {
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        let v: u32 = match port {
            PORT_ID => PV_MAGIC,
            PORT_SLEEP => self.tsc_khz,
            _ => u32::MAX,
        };
        for (i, b) in data.iter_mut().enumerate() {
            *b = v.checked_shr(8 * i as u32).unwrap_or(0) as u8;
        }
    }

    fn pio_write(&mut self, port: u16, data: &[u8]) -> IoAction {
        let v = le_value(data);
        match port {
            PORT_SLEEP => IoAction::Sleep(Duration::from_micros(v).min(MAX_SLEEP)),
            PORT_POWER_OFF => IoAction::PowerOff(v as u8),
            PORT_MAILBOX if v.is_multiple_of(4096) && v != 0 => {
                self.state.mailbox = Some(v);
                IoAction::Continue
            }
            PORT_SECRET_PAGE => {
                self.state.secret_page = v;
                IoAction::Continue
            }
            PORT_SECRET_PAGES if v > 0 && self.state.secrets.len() < MAX_SECRETS => {
                let region = (self.state.secret_page * 4096, v * 4096);
                if !self.state.secrets.contains(&region) {
                    self.state.secrets.push(region);
                }
                IoAction::Continue
            }
            _ => IoAction::Continue,
        }
    }
}

/// The console-line port: reads the line from guest memory and hands its bytes to the serial
/// device, so that they reach the same output (and the same saved state) as port writes would.
pub struct ConsoleLine {
    ram: Arc<GuestRam>,
    serial: SharedDevice,
    serial_data_port: u16,
}

impl ConsoleLine {
    /// A port writing lines read from `ram` to `serial`'s data port.
    pub fn new(ram: Arc<GuestRam>, serial: SharedDevice, serial_data_port: u16) -> Self {
        ConsoleLine {
            ram,
            serial,
            serial_data_port,
        }
    }
}

impl PioDevice for ConsoleLine {
    fn pio_read(&mut self, _: u16, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn pio_write(&mut self, _: u16, data: &[u8]) -> IoAction {
        // A bad address or length is the guest's mistake: its line is dropped, nothing else.
        let gpa = le_value(data);
        let mut len = [0u8; 2];
        if self.ram.read(gpa, &mut len).is_err() {
            return IoAction::Continue;
        }
        let mut buf = [0u8; MAX_CONSOLE_LINE];
        let line = &mut buf[..(u16::from_le_bytes(len) as usize).min(MAX_CONSOLE_LINE)];
        if self.ram.read(gpa.saturating_add(2), line).is_err() {
            return IoAction::Continue;
        }
        let mut serial = lock(&self.serial);
        for &b in line.iter() {
            serial.pio_write(self.serial_data_port, &[b]);
        }
        IoAction::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_behave_as_documented() {
        let mut d = PvDevice::new(2_000_000, PvState::default());
        let mut b = [0u8; 4];
        d.pio_read(PORT_ID, &mut b);
        assert_eq!(u32::from_le_bytes(b), PV_MAGIC);
        d.pio_read(PORT_SLEEP, &mut b);
        assert_eq!(u32::from_le_bytes(b), 2_000_000);
        assert_eq!(
            d.pio_write(PORT_SLEEP, &1500u32.to_le_bytes()),
            IoAction::Sleep(Duration::from_micros(1500))
        );
        assert_eq!(
            d.pio_write(PORT_SLEEP, &u32::MAX.to_le_bytes()),
            IoAction::Sleep(MAX_SLEEP)
        );
        assert_eq!(d.pio_write(PORT_POWER_OFF, &[3]), IoAction::PowerOff(3));
        d.pio_write(PORT_MAILBOX, &0x1234u32.to_le_bytes()); // unaligned: ignored
        assert_eq!(d.state.mailbox, None);
        d.pio_write(PORT_MAILBOX, &0x20_0000u32.to_le_bytes());
        assert_eq!(d.state.mailbox, Some(0x20_0000));
        d.pio_write(PORT_SECRET_PAGE, &0x300u32.to_le_bytes());
        d.pio_write(PORT_SECRET_PAGES, &2u32.to_le_bytes());
        assert_eq!(d.state.secrets, vec![(0x30_0000, 0x2000)]);
    }

    /// Collects what the console-line port hands to the serial device.
    struct Recorder(Vec<(u16, u8)>);

    impl PioDevice for Recorder {
        fn pio_read(&mut self, _: u16, _: &mut [u8]) {}
        fn pio_write(&mut self, port: u16, data: &[u8]) -> IoAction {
            self.0.push((port, data[0]));
            IoAction::Continue
        }
    }

    #[test]
    fn a_console_line_reaches_the_serial_port_byte_by_byte() {
        let ram = Arc::new(GuestRam::new(2 << 20).unwrap());
        let rec = Arc::new(std::sync::Mutex::new(Recorder(Vec::new())));
        let mut port = ConsoleLine::new(ram.clone(), rec.clone(), 0x3f8);
        ram.write(0x2000, &[6, 0]).unwrap();
        ram.write(0x2002, b"hello\n").unwrap();
        assert_eq!(
            port.pio_write(PORT_CONSOLE_LINE, &0x2000u32.to_le_bytes()),
            IoAction::Continue
        );
        let got: Vec<u8> = lock(&rec)
            .0
            .iter()
            .map(|&(p, b)| {
                assert_eq!(p, 0x3f8);
                b
            })
            .collect();
        assert_eq!(got, b"hello\n");
        // A line reaching past the end of RAM, or an address outside it: dropped.
        ram.write((2 << 20) - 4, &[200, 0]).unwrap();
        port.pio_write(PORT_CONSOLE_LINE, &((2u32 << 20) - 4).to_le_bytes());
        port.pio_write(PORT_CONSOLE_LINE, &u32::MAX.to_le_bytes());
        assert_eq!(lock(&rec).0.len(), 6);
    }
}
