data "aws_partition" "current" {}

data "aws_region" "current" {}

locals {
  # The wheel that `make dist` builds and CI publishes: an https:// URL, or an s3:// object
  # that the host fetches with its instance role. pip installs it with --only-binary=:all:, so
  # neither kmskeys nor a dependency is ever built from source: the host has no compiler.
  wheel      = var.kmskeys_wheel == null ? "" : var.kmskeys_wheel
  wheel_s3   = startswith(local.wheel, "s3://")
  wheel_name = try(regex("[^/]+$", local.wheel), "")
  s3_parts   = split("/", trimprefix(local.wheel, "s3://"))
  s3_bucket  = local.s3_parts[0]
  s3_key     = join("/", slice(local.s3_parts, 1, length(local.s3_parts)))
  wheel_file = "/opt/kmskeys/dist/${local.wheel_name}"
  # pip checks a #sha256= fragment of a direct reference before it installs anything.
  wheel_hash        = var.kmskeys_wheel_sha256 == null ? "" : "#sha256=${var.kmskeys_wheel_sha256}"
  wheel_url         = local.wheel_s3 ? "file://${local.wheel_file}" : local.wheel
  wheel_requirement = "kmskeys[resolver] @ ${local.wheel_url}${local.wheel_hash}"

  pip = ["/opt/kmskeys/bin/pip", "install", "--no-input", "--only-binary=:all:"]

  # Only for an s3:// wheel: botocore first (a wheel from the index), then the object, read
  # with the instance role's credentials from IMDS.
  fetch_wheel = local.wheel_s3 ? [
    ["install", "-d", "-m", "0755", "/opt/kmskeys/dist"],
    concat(local.pip, ["botocore"]),
    ["/opt/kmskeys/bin/python", "-c", local.fetch_snippet, local.s3_bucket, local.s3_key, local.wheel_file, data.aws_region.current.name],
  ] : []

  fetch_snippet = join("; ", [
    "import pathlib, sys, botocore.session",
    "bucket, key, dest, region = sys.argv[1:5]",
    "s3 = botocore.session.get_session().create_client('s3', region_name=region)",
    "pathlib.Path(dest).write_bytes(s3.get_object(Bucket=bucket, Key=key)['Body'].read())",
  ])

  # cloud-init user data. runcmd runs once, as root, after packages are installed.
  # `kmskeys-resolver install` registers the request-key handler for this module's key; the
  # firewall lets only root reach IMDS, so no other local user can borrow the instance role.
  cloud_config = {
    package_update = true
    packages       = var.os_packages
    write_files = var.resolver_config == "" ? [] : [
      {
        path        = "/etc/kmskeys/resolver.toml"
        owner       = "root:root"
        permissions = "0600"
        content     = var.resolver_config
      },
    ]
    runcmd = concat(
      [["python3", "-m", "venv", "/opt/kmskeys"]],
      local.fetch_wheel,
      [
        concat(local.pip, [local.wheel_requirement]),
        ["ln", "-sf", "/opt/kmskeys/bin/kmskeys-resolver", "/usr/local/sbin/kmskeys-resolver"],
        ["ln", "-sf", "/opt/kmskeys/bin/kmskeys", "/usr/local/bin/kmskeys"],
        ["/usr/local/sbin/kmskeys-resolver", "install", "--key-arn", var.kms_key_arn],
        ["/usr/local/sbin/kmskeys-resolver", "firewall", "apply"],
        # The unit re-applies the rules on every boot, before the network comes up; it ships
        # as package data of the resolver.
        ["/opt/kmskeys/bin/python", "-c", local.copy_unit],
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable", "--now", "kmskeys-firewall.service"],
      ],
    )
  }

  user_data = "#cloud-config\n${yamlencode(local.cloud_config)}"

  copy_unit = join("; ", [
    "import importlib.resources, shutil",
    "unit = importlib.resources.files('resolver') / 'data' / 'kmskeys-firewall.service'",
    "shutil.copyfile(unit, '/etc/systemd/system/kmskeys-firewall.service')",
  ])

  # Every KMS action that creates ciphertext or hands out a way to.
  encrypting_actions = ["kms:Encrypt", "kms:GenerateDataKey*", "kms:ReEncrypt*", "kms:CreateGrant"]

  # The seal key's binding: the same conditions as the seal key's own policy (modules/kms-key,
  # where each one is explained).
  seal_conditions = [
    { test = "StringEquals", variable = "kms:EncryptionContext:kmskeys_seal", values = ["stored"] },
    { test = "StringEquals", variable = "kms:EncryptionContext:kmskeys_host", values = ["$${ec2:SourceInstanceARN}"] },
    { test = "StringLike", variable = "kms:EncryptionContext:kmskeys_scope", values = ["user:*", "machine"] },
    { test = "Null", variable = "kms:EncryptionContext:kmskeys_name", values = ["false"] },
    { test = "Null", variable = "ec2:SourceInstanceARN", values = ["false"] },
    { test = "ForAllValues:StringEquals", variable = "kms:EncryptionContextKeys", values = ["kmskeys_host", "kmskeys_name", "kmskeys_scope", "kmskeys_seal"] },
  ]
}

data "aws_iam_policy_document" "trust" {
  statement {
    sid     = "EC2AssumeRole"
    effect  = "Allow"
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "this" {
  name                 = var.name
  path                 = var.path
  description          = "kmskeys resolver host: Decrypt of the names it is given; never Encrypt"
  assume_role_policy   = data.aws_iam_policy_document.trust.json
  permissions_boundary = var.permissions_boundary_arn
  tags                 = var.tags
}

data "aws_iam_policy_document" "kms" {
  statement {
    sid       = "DecryptWithNameBinding"
    effect    = "Allow"
    actions   = ["kms:Decrypt"]
    resources = [var.kms_key_arn]

    condition {
      test     = "ForAnyValue:StringEquals"
      variable = "kms:EncryptionContextKeys"
      values   = ["kmskeys_name"]
    }

    condition {
      test     = "Null"
      variable = "kms:EncryptionContext:kmskeys_name"
      values   = ["false"]
    }

    condition {
      test     = "StringLike"
      variable = "kms:EncryptionContext:kmskeys_name"
      values   = var.allowed_secret_names
    }
  }

  # The opt-in seal key of the stored: keystore: wrap and unwrap entries bound to this very
  # instance, nothing else.
  dynamic "statement" {
    for_each = var.enable_seal ? [1] : []

    content {
      sid       = "SealWithHostBinding"
      effect    = "Allow"
      actions   = ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey"]
      resources = [var.seal_key_arn]

      dynamic "condition" {
        for_each = local.seal_conditions

        content {
          test     = condition.value.test
          variable = condition.value.variable
          values   = condition.value.values
        }
      }
    }
  }

  # Explicit deny: a host never creates blobs, even if a broader policy is attached later.
  # ReEncrypt and grants are refused for the same reason. With the seal on, the deny covers
  # every key but the seal key (NotResource), and the next statement narrows that one.
  statement {
    sid           = "NeverEncrypt"
    effect        = "Deny"
    actions       = local.encrypting_actions
    resources     = var.enable_seal ? null : ["*"]
    not_resources = var.enable_seal ? [var.seal_key_arn] : null
  }

  dynamic "statement" {
    for_each = var.enable_seal ? [1] : []

    content {
      sid    = "SealKeyOnlyWrapsAndUnwraps"
      effect = "Deny"
      actions = [
        "kms:CreateGrant",
        "kms:GenerateDataKeyPair*",
        "kms:GenerateDataKeyWithoutPlaintext",
        "kms:ReEncrypt*",
      ]
      resources = [var.seal_key_arn]
    }
  }

  lifecycle {
    precondition {
      condition     = !var.enable_seal || var.seal_key_arn != null
      error_message = "enable_seal needs seal_key_arn (output seal_key_arn of the kms-key module)."
    }
  }
}

resource "aws_iam_role_policy" "kms" {
  name   = "kmskeys-decrypt"
  role   = aws_iam_role.this.id
  policy = data.aws_iam_policy_document.kms.json
}

# Only with an s3:// wheel: that one object, nothing else in the bucket.
data "aws_iam_policy_document" "wheel" {
  count = local.wheel_s3 ? 1 : 0

  statement {
    sid       = "FetchKmskeysWheel"
    effect    = "Allow"
    actions   = ["s3:GetObject"]
    resources = ["arn:${data.aws_partition.current.partition}:s3:::${local.s3_bucket}/${local.s3_key}"]
  }
}

resource "aws_iam_role_policy" "wheel" {
  count = local.wheel_s3 ? 1 : 0

  name   = "kmskeys-wheel"
  role   = aws_iam_role.this.id
  policy = data.aws_iam_policy_document.wheel[0].json
}

resource "aws_iam_instance_profile" "this" {
  name = var.name
  path = var.path
  role = aws_iam_role.this.name
  tags = var.tags
}

resource "aws_launch_template" "this" {
  count = var.create_launch_template ? 1 : 0

  name_prefix            = "${var.name}-"
  description            = "kmskeys resolver host: IMDSv2 only, hop limit 1"
  image_id               = var.image_id
  instance_type          = var.instance_type
  vpc_security_group_ids = var.security_group_ids
  ebs_optimized          = true
  update_default_version = true
  user_data              = base64encode(local.user_data)

  iam_instance_profile {
    arn = aws_iam_instance_profile.this.arn
  }

  # IMDSv2 tokens only, and a PUT hop limit of 1: a token cannot be fetched from a container
  # or through a forwarding hop, only from the host itself, where the firewall limits it to root.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    http_protocol_ipv6          = var.imds_ipv6 ? "enabled" : "disabled"
    instance_metadata_tags      = "disabled"
  }

  monitoring {
    enabled = true
  }

  block_device_mappings {
    device_name = var.root_device_name

    ebs {
      encrypted             = true
      kms_key_id            = var.ebs_kms_key_arn
      volume_size           = var.root_volume_size
      volume_type           = "gp3"
      delete_on_termination = true
    }
  }

  tag_specifications {
    resource_type = "instance"
    tags          = var.tags
  }

  tag_specifications {
    resource_type = "volume"
    tags          = var.tags
  }

  tags = var.tags

  lifecycle {
    precondition {
      condition     = var.image_id != null
      error_message = "create_launch_template needs image_id."
    }

    precondition {
      condition     = var.kmskeys_wheel != null
      error_message = "create_launch_template needs kmskeys_wheel: the wheel `make dist` builds, published by CI."
    }
  }
}
