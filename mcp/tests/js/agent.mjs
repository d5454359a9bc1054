// An agent session with the official MCP TypeScript SDK client: every step's result is printed
// as one JSON line for the Rust test to check. Usage: node agent.mjs MCP_URL ACCOUNT OTHERS_PROJECT_ID
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';

const [url, account, othersProject] = process.argv.slice(2);
const out = (step, value) => console.log(JSON.stringify({ step, value }));

const client = new Client({ name: 'tollgate-test-agent', version: '1.0.0' });
const transport = new StreamableHTTPClientTransport(new URL(url), {
  requestInit: { headers: { 'x-tollgate-test-account': account } },
});
await client.connect(transport);
out('server', client.getServerVersion());

const { tools } = await client.listTools();
out('tools', tools.map((t) => ({ name: t.name, hasOutputSchema: !!t.outputSchema, description: t.description })));

const call = async (name, args, opts) => {
  const r = await client.callTool({ name, arguments: args }, undefined, opts);
  return { isError: !!r.isError, structured: r.structuredContent ?? null, text: r.content?.[0]?.text ?? null, meta: r._meta ?? null };
};

const progress = [];
const files = {
  'src/index.ts': "import { Hono } from 'hono'\nimport { msg } from './msg'\nconst app = new Hono()\napp.get('/', (c) => { console.log('served /'); return c.text(msg) })\nexport default app\n",
  'src/msg.ts': "export const msg = 'deployed over MCP'\n",
};
out('deploy', await call('deploy_project', { files, project_name: 'mcp-app' }, { onprogress: (p) => progress.push(p) }));
out('progress', progress);
const deployed = (await call('list_projects', {})).structured.projects[0];
out('list', deployed);
out('read', await call('read_project_file', { project_id: deployed.project_id, path: 'src/msg.ts' }));
out('bad_deploy', await call('deploy_project', { changes: { 'src/msg.ts': 'export const msg = (' }, project_id: deployed.project_id }));
out('not_found', await call('get_project', { project_id: 'p_doesnotexist' }));
out('others_get', await call('get_project', { project_id: othersProject }));
out('others_delete', await call('delete_project', { project_id: othersProject }));
out('others_logs', await call('get_logs', { project_id: othersProject }));
out('get', await call('get_project', { project_id: deployed.project_id }));
out('logs', await call('get_logs', { project_id: deployed.project_id }));
out('delete', await call('delete_project', { project_id: deployed.project_id }));
out('after_delete', await call('list_projects', {}));
await client.close();
