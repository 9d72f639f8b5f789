/**
 * The VGA screen as the machine Worker reports it: text modes as text in the page (selectable, like the serial
 * console's), graphics modes as v86's frame buffer on a canvas scaled to fit. Keys typed while it has focus go
 * to the guest's PS/2 keyboard as scancodes, through the same US-layout map `qcow86 boot --send-keys` uses (the
 * Worker has no v86 keyboard adapter, so v86's own text typing cannot work there); the Worker queues them until
 * the guest reads them, as `--send-keys` does (src/v86/key-pacing.ts).
 */
import { scancodesForKeyEvent } from '../v86/keyboard.js';
import type { MachineClient } from './machine-client.js';
import type { MachineEvent } from './machine-protocol.js';

export interface ScreenView {
  apply(event: MachineEvent): void;
  /** Whether the guest has drawn anything but blanks (text) or is in a graphics mode. */
  readonly hasContent: boolean;
}

export function createScreen(element: HTMLElement, machine: MachineClient): ScreenView {
  const text = element.querySelector<HTMLElement>('.text')!;
  const canvas = element.querySelector<HTMLCanvasElement>('canvas')!;
  const context = canvas.getContext('2d', { alpha: false })!;
  let hasContent = false;
  element.addEventListener('mousedown', () => element.focus());
  element.addEventListener('keydown', (event) => {
    const codes = scancodesForKeyEvent(event);
    if (!codes) return;
    machine.keyboard_send_scancodes(codes);
    event.preventDefault();
  });
  const show = (graphics: boolean) => {
    text.hidden = graphics;
    canvas.hidden = !graphics;
    element.dataset.mode = graphics ? 'graphics' : 'text';
  };
  return {
    get hasContent() {
      return hasContent;
    },
    apply(event) {
      if (event.event === 'screen') {
        show(false);
        const content = event.rows.map((row) => row.replace(/\s+$/, '')).join('\n');
        text.textContent = content;
        hasContent ||= content.trim() !== '';
        return;
      }
      if (event.event === 'frame') {
        show(true);
        hasContent = true;
        if (canvas.width !== event.width || canvas.height !== event.height) {
          canvas.width = event.width;
          canvas.height = event.height;
        }
        const pixels = new Uint8ClampedArray(event.rgba.buffer as ArrayBuffer, event.rgba.byteOffset, event.rgba.byteLength);
        context.putImageData(new ImageData(pixels, event.width, event.height), 0, 0);
      }
    },
  };
}
