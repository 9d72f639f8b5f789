/** README's example of the machine library in a Vitest test, run by library.test.ts (which checks README shows it). */
import { writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { expect, test } from 'vitest';
import { bootMachine } from 'qcow86/machine';

test('the guest boots and runs a command', async () => {
  const machine = await bootMachine({ memory: '128M' });
  try {
    await machine.expect('# ');
    const { match } = await machine.send('uname -m; echo done-$((6*7))\n').expect(/(\w+)\ndone-42/);
    expect(match[1]).toBe('i686');
    await machine.expect('# ', { on: 'screen' }); // tty1 has a shell too
    writeFileSync(join(tmpdir(), 'guest-screen.png'), machine.screenshot());
  } finally {
    await machine.close();
  }
}, 300_000);
